"""One prefix-cached evaluator of arithmetic answers under interventions, shared by the head sweep and CNA.

Greedy exact match is judged by teacher forcing (:mod:`lmaudit.checks.core.accuracy`): slot ``j`` of a problem checks
``argmax p(· | prompt, a_<j) = a_j``, its last slot that the next token does not continue the number. Three
things make re-evaluating the same problems under many interventions cheap, all exact given the same inputs:

1. **Shared prefixes.** Problems are grouped by their few-shot lines (``generate_problems(shared_shots=True)``
   gives one prefix per operation and template); each group's longest common token prefix runs once with a KV
   cache, and its suffixes (the rest of the prompt and the answer) run on that cache.
2. **Layer skip.** An intervention confined to layers ``≥ L`` leaves the residual stream entering layer ``L``
   unchanged, so the clean run's hidden states entering ``L`` are kept (for each layer in ``layers``) and an
   evaluation re-runs only layers ``≥ L`` (:func:`lmaudit.checks.core.layer_skip.start_at_layer`): the prefix
   from its clean state (its keys/values from ``L`` on change), then the suffixes on the clean cache below ``L``
   and the re-run one from ``L`` on. The skipped layers never read their cache, so they stay at batch 1.
3. **Replicas.** :meth:`PrefixCachedEvaluator.correct_replicas` evaluates ``R`` interventions in one batch: row
   ``r·m + i`` is problem ``i`` under replica ``r``, and the intervention receives each row's replica (e.g.
   :func:`lmaudit.checks.core.interventions.scale_heads_per_row`: replica ``r`` ablates head ``r``).

The judge unembeds only what decides it: slot ``j`` is unembedded (``adapter.logits`` of the final norm's input)
only for rows whose slots ``< j`` were right, so no pass computes the model's own logits. With a prefix of ``P``
tokens, ``n`` suffixes of ``S`` and ``N`` layers, one evaluation from layer ``L`` costs ``(N − L)/N`` of
``P + n·S`` token-layers instead of ``n·(P + S)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lmaudit.checks.core.accuracy import (
    EncodedAnswer,
    TeacherForcedBatch,
    digit_start_mask,
    encode_problems,
    no_logits,
    pad_token_id,
    teacher_forced_batch,
)
from lmaudit.checks.core.arithmetic_problems import ArithmeticProblem
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.kv_cache import cache_argument, cache_from, layer_keys_values
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.loading import LoadedModel

# Rows (replica × problem) per pass: 9 heads × 64 prompts × ~10 suffix tokens stays near 100 MB of activations
# per layer on a 135M model.
DEFAULT_MAX_ROWS = 1024

# ``intervene(replica_of_row)``: a context manager that applies, to batch row ``i``, the intervention of replica
# ``replica_of_row[i]`` (a ``(rows,)`` long tensor).
Intervene = Callable[[torch.Tensor], AbstractContextManager[Any]]


def common_prefix_length(encoded: Sequence[EncodedAnswer]) -> int:
    """Tokens shared by every sequence, leaving each at least one prompt token (the first checked position)."""
    limit = min(len(e.prompt_ids) for e in encoded) - 1
    first = encoded[0].sequence
    length = 0
    while length < limit and all(e.sequence[length] == first[length] for e in encoded):
        length += 1
    return length


def prefix_groups(problems: Sequence[ArithmeticProblem]) -> list[str]:
    """One label per problem: its few-shot lines (the prompt before its last line), which it shares with the
    other problems of its operation and template."""
    return [p.prompt.rpartition("\n")[0] for p in problems]


@dataclass(frozen=True)
class _Group:
    """Problems sharing one token prefix: the clean prefix cache and the clean states entering each kept layer."""

    index: torch.Tensor  # (n_g,) positions in the problem list
    prefix: torch.Tensor  # (1, P) shared prefix ids (P may be 0)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]  # clean keys/values per layer, batch 1
    prefix_hidden: dict[int, torch.Tensor]  # layer -> (1, P, hidden) entering it
    batch: TeacherForcedBatch  # the suffixes after the prefix
    suffix_hidden: dict[int, torch.Tensor]  # layer -> (n_g, S, hidden) entering it

    @property
    def prefix_len(self) -> int:
        return self.prefix.shape[1]


class PrefixCachedEvaluator:
    """Teacher-forced greedy correctness of fixed problems, clean (:attr:`baseline`) and under interventions
    confined to layers ``≥ start`` for any ``start`` in ``layers`` (module docstring).

    ``groups[i]`` labels problem ``i``; problems of one label share a token prefix that is cached once.
    Construction runs the clean model once per group and keeps, for each layer of ``layers``, the hidden states
    entering it (memory: ``len(layers) × (P + n·S) × hidden`` floats).
    """

    def __init__(self, loaded: LoadedModel, encoded: Sequence[EncodedAnswer], *, groups: Sequence[Hashable],
                 layers: Sequence[int], stop_check: bool = True, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.model, self.adapter = loaded.model, loaded.adapter
        self.layers = sorted(set(int(layer) for layer in layers))
        for layer in self.layers:
            if not 0 <= layer < self.adapter.n_layers:
                raise IndexError(f"layer {layer} out of range 0..{self.adapter.n_layers - 1}")
        if len(groups) != len(encoded):
            raise ValueError(f"{len(encoded)} problems but {len(groups)} group labels")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.n, self.max_rows = len(encoded), max_rows
        self._digit_start = digit_start_mask(loaded.tokenizer)
        self._no_logits = no_logits(self.model)
        pad = pad_token_id(loaded.tokenizer)
        self._groups: list[_Group] = []
        self.baseline = torch.zeros(self.n, dtype=torch.bool)  # (n,) clean correctness
        for label in dict.fromkeys(groups):
            index = torch.tensor([i for i, g in enumerate(groups) if g == label])
            group, ok = self._prepare([encoded[i] for i in index], index, pad, stop_check)
            self._groups.append(group)
            self.baseline[index] = ok

    @classmethod
    def for_problems(cls, loaded: LoadedModel, problems: Sequence[ArithmeticProblem], *, layers: Sequence[int],
                     stop_check: bool = True, max_rows: int = DEFAULT_MAX_ROWS) -> PrefixCachedEvaluator:
        """Problems grouped by their few-shot lines (:func:`prefix_groups`)."""
        return cls(loaded, encode_problems(loaded.tokenizer, problems), groups=prefix_groups(problems),
                   layers=layers, stop_check=stop_check, max_rows=max_rows)

    # ------------------------------------------------------------------ clean pass

    @torch.no_grad()
    def _prepare(self, encoded: list[EncodedAnswer], index: torch.Tensor, pad: int,
                 stop_check: bool) -> tuple[_Group, torch.Tensor]:
        """The clean passes of one group: the group and its clean correctness ``(n_g,)``."""
        device = self.adapter.device
        prefix_len = common_prefix_length(encoded)
        prefix = torch.tensor([encoded[0].sequence[:prefix_len]], dtype=torch.long)
        prefix_hidden: dict[int, torch.Tensor] = {}
        prefix_kv: list = []
        if prefix_len:
            out = self.model(input_ids=prefix.to(device), use_cache=True, output_hidden_states=True,
                             **self._no_logits)
            prefix_hidden = {layer: out.hidden_states[layer] for layer in self.layers}
            prefix_kv = layer_keys_values(out)
        batch = teacher_forced_batch(encoded, pad_id=pad, offset=prefix_len, stop_check=stop_check)
        final, hidden = self._suffix_pass(prefix_len, batch, prefix_kv, skipped=0, hidden_states=True)
        group = _Group(index, prefix, prefix_kv, prefix_hidden, batch,
                       {layer: hidden[layer] for layer in self.layers})
        return group, self._judge(final, batch.expected)

    def _suffix_pass(self, prefix_len: int, batch: TeacherForcedBatch, kv: list, *, skipped: int,
                     hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the suffixes of ``batch`` after a cached prefix (``kv``: per layer, batch 1 or ``len(batch)``;
        the ``skipped`` lowest layers are never read). Returns the final residual (the final norm's input) at
        each checked slot ``(n, slots, hidden)`` and, when asked, the hidden states entering every layer."""
        n, device = len(batch), self.adapter.device
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask, "use_cache": False, **self._no_logits}
        if prefix_len:
            kwargs[cache_argument(self.model)] = cache_from(self.model, list(kv[:skipped]) + [
                (k.expand(n, *k.shape[1:]), v.expand(n, *v.shape[1:])) for k, v in kv[skipped:]])
            kwargs["use_cache"] = True
            kwargs["attention_mask"] = torch.cat([torch.ones(n, prefix_len, dtype=torch.long),
                                                  batch.attention_mask], 1)
        kwargs["attention_mask"] = kwargs["attention_mask"].to(device)
        with capture({"final": self.adapter.final_norm}, what="input") as cap:
            out = self.model(input_ids=batch.input_ids.to(device), output_hidden_states=hidden_states, **kwargs)
        rows = torch.arange(n, device=device)[:, None]
        final = cap.input("final")[rows, batch.positions.to(device)]  # (n, slots, hidden)
        return final, tuple(out.hidden_states) if hidden_states else ()

    def _judge(self, final: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        """``(n,)`` bool from the final residuals at the checked slots, slot by slot, unembedding a slot only
        for rows whose earlier slots were right."""
        ok = torch.ones(len(expected), dtype=torch.bool)
        for slot in range(expected.shape[1]):
            rows = torch.nonzero(ok & (expected[:, slot] != TeacherForcedBatch.PAD)).flatten()
            if not len(rows):
                break
            predicted = self.adapter.logits(final[rows.to(final.device), slot]).argmax(-1).cpu()  # (m,)
            want = expected[rows, slot]
            ok[rows] = torch.where(want == TeacherForcedBatch.STOP, ~self._digit_start[predicted], predicted == want)
        return ok

    # ------------------------------------------------------------------ interventions

    def _check_start(self, start: int) -> None:
        if start not in self.layers:
            raise ValueError(f"start layer {start} was not kept: the evaluator keeps layers {self.layers}")

    @torch.no_grad()
    def correct(self, start: int) -> torch.Tensor:
        """``(n,)`` bool under whatever intervention is active, which must touch only layers ``≥ start``."""
        return self.correct_replicas(start, 1, lambda rows: nullcontext())[0]

    @torch.no_grad()
    def correct_replicas(self, start: int, replicas: int, intervene: Intervene,
                         subset: torch.Tensor | None = None) -> torch.Tensor:
        """``(replicas, n_subset)`` bool: the problems of ``subset`` (indices, default all, in that order) under
        each replica's intervention (``intervene``, module docstring), re-running layers ``≥ start`` only."""
        self._check_start(start)
        subset = torch.arange(self.n) if subset is None else torch.as_tensor(subset, dtype=torch.long)
        out = torch.zeros((replicas, len(subset)), dtype=torch.bool)
        where = torch.full((self.n,), -1, dtype=torch.long)
        where[subset] = torch.arange(len(subset))
        for group in self._groups:
            local = torch.nonzero(where[group.index] >= 0).flatten()  # rows of this group in the subset
            if not len(local):
                continue
            batch = _rows(group.batch, local)
            m = len(local)
            for first in range(0, replicas, max(1, self.max_rows // m)):
                chunk = torch.arange(first, min(replicas, first + max(1, self.max_rows // m)))
                ok = self._run(group, local, batch, start, chunk, intervene)  # (len(chunk)·m,)
                out[chunk[:, None], where[group.index[local]][None, :]] = ok.view(len(chunk), m)
        return out

    def _run(self, group: _Group, local: torch.Tensor, batch: TeacherForcedBatch, start: int, chunk: torch.Tensor,
             intervene: Intervene) -> torch.Tensor:
        """One pass of the ``len(chunk)`` replicas over the group's rows ``local`` (replica-major)."""
        r, m = len(chunk), len(local)
        device = self.adapter.device
        kv = group.prefix_kv
        if group.prefix_len:
            hidden = group.prefix_hidden[start].expand(r, -1, -1).contiguous()
            with start_at_layer(self.adapter, start, hidden), intervene(chunk):
                prefix_out = self.model(input_ids=group.prefix.expand(r, -1).to(device), use_cache=True,
                                        **self._no_logits)
            rerun = layer_keys_values(prefix_out)[start:]  # (r, ...) per layer from ``start`` on
            kv = list(group.prefix_kv[:start]) + [(k.repeat_interleave(m, 0), v.repeat_interleave(m, 0))
                                                  for k, v in rerun]
        width = batch.input_ids.shape[1]
        tiled = TeacherForcedBatch(batch.input_ids.repeat(r, 1), batch.attention_mask.repeat(r, 1),
                                   batch.positions.repeat(r, 1), batch.expected.repeat(r, 1))
        hidden = group.suffix_hidden[start][local, :width].repeat(r, 1, 1)
        with start_at_layer(self.adapter, start, hidden), intervene(chunk.repeat_interleave(m)):
            final, _ = self._suffix_pass(group.prefix_len, tiled, kv, skipped=start)
        return self._judge(final, tiled.expected)


def _rows(batch: TeacherForcedBatch, local: torch.Tensor) -> TeacherForcedBatch:
    """Rows ``local`` of a right-padded batch, trimmed to their longest sequence (positions are unchanged)."""
    width = int(batch.attention_mask[local].sum(1).max())
    return TeacherForcedBatch(batch.input_ids[local, :width], batch.attention_mask[local, :width],
                              batch.positions[local], batch.expected[local])
