"""The model edits that the super-weight checks compare, and the re-scoring of fixed windows under them.

Every condition is a context manager; on exit the model is as it was, bit for bit:

======================  ==========================================================================================
``prune``               ``W_down[ℓ][row, col] = 0`` for every super weight (core ``edit_down_proj_weights``)
``scale``               ``W_down[ℓ][row, col] *= s``
``prune_others``        the ``n`` largest-magnitude weights of the decoder's Linear layers other than the super
                        weights set to 0 (core ``zero_weights``; the super weights stay)
``prune_and_restore``   ``prune`` and, in every sequence, the super activation put back where it appears in *that*
                        sequence (the paper's "Prune SW, +SA")
======================  ==========================================================================================

``prune_and_restore`` follows the paper's code (``removeSW_restoreSA`` in LLMSuperWeight): per sequence, the
clean down-projection output of the super weights' row is ``y_clean[t] = y_pruned[t] + Σ_col W[row, col]·x[t, col]``
(only the pruned weights differ), its position ``t* = argmax_t |y_clean[t]|`` is where the super activation sits
in that sequence, and ``y[t*, row] = y_clean[t*]`` there only; every other position keeps the pruned output. So
the value restored is the one that sequence would have had, at the position it has it: token 0 for a BOS in
front, wherever a sequence without BOS carries it. The edit is a forward hook on the down projection (installed
through :mod:`lmaudit.checks.core.hooks`); it belongs in :mod:`lmaudit.checks.core.interventions` and lives here
until it moves there.

:class:`WindowCache` re-scores the same perplexity windows under any condition, starting at the earliest edited
layer (:func:`lmaudit.checks.core.layer_skip.start_at_layer`): the clean run keeps the hidden state entering
that layer, which no edit at or above it can change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.interventions import edit_down_proj_weights
from lmaudit.checks.core.layer_skip import start_at_layer
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import model_forward
from lmaudit.checks.core.outliers import Coordinate
from lmaudit.checks.core.perplexity import perplexity_from_nll, window_nll

Condition = Callable[[], contextlib.AbstractContextManager[Any]]
UNEDITED = "unedited"  # the label of no edit (the original model, scale 1)
PRUNED = "prune_sw"  # the label of every super weight set to 0 (scale 0)
PAPER_OTHERS_SHARE = 7000 / 6.74e9  # Table 1: the 7000 largest other weights of Llama-7B's 6.74e9 parameters


def prune(adapter: ArchitectureAdapter, coordinates: Sequence[Coordinate]) -> contextlib.AbstractContextManager[None]:
    """Every super weight set to 0."""
    return edit_down_proj_weights(adapter, coordinates, value=0.0)


def scale(adapter: ArchitectureAdapter, coordinates: Sequence[Coordinate],
          factor: float) -> contextlib.AbstractContextManager[None]:
    """Every super weight multiplied by ``factor``."""
    return edit_down_proj_weights(adapter, coordinates, scale=factor)


def others_count(adapter: ArchitectureAdapter, share: float) -> int:
    """How many other weights to prune: ``share`` of the model's parameters, at least one."""
    return max(1, round(share * adapter.parameter_count))


def largest_other_weights(adapter: ArchitectureAdapter, n: int,
                          exclude: Sequence[Coordinate]) -> dict[nn.Module, tuple[Tensor, Tensor]]:
    """The ``n`` largest-|w| weights of all decoder Linear layers except the ``exclude``\\ d down-projection
    elements: ``{module: (rows, cols)}`` in the ``[out, in]`` view."""
    excluded = {(id(adapter.down_proj(layer)), row, col) for layer, row, col in exclude}
    modules = list(adapter.decoder_linears().values())
    values, owners, flats = [], [], []
    for index, module in enumerate(modules):  # the top n (+ excluded) of each module are enough to merge
        w = adapter.weight(module).detach().abs().flatten()  # (out*in,)
        top, flat = torch.topk(w, min(w.numel(), n + len(exclude)))
        values.append(top)
        owners.append(torch.full_like(flat, index))
        flats.append(flat)
    value, owner, flat = torch.cat(values), torch.cat(owners), torch.cat(flats)
    chosen: dict[nn.Module, list[tuple[int, int]]] = {}
    taken = 0
    for i in torch.argsort(value, descending=True).tolist():
        module = modules[int(owner[i])]
        row, col = divmod(int(flat[i]), adapter.weight(module).shape[1])
        if (id(module), row, col) in excluded:
            continue
        chosen.setdefault(module, []).append((row, col))
        taken += 1
        if taken == n:
            break
    return {m: (torch.tensor([r for r, _ in rc]), torch.tensor([c for _, c in rc])) for m, rc in chosen.items()}


def layer_of(adapter: ArchitectureAdapter, module: nn.Module) -> int:
    """The decoder layer that holds ``module``."""
    for index, layer in enumerate(adapter.layers):
        if any(m is module for m in layer.layer.modules()):
            return index
    raise KeyError(f"{type(module).__name__} is not inside a decoder layer")


def scale_label(factor: float) -> str:
    """The label of every super weight scaled by ``factor`` (0: :data:`PRUNED`, 1: :data:`UNEDITED`)."""
    return UNEDITED if factor == 1.0 else PRUNED if factor == 0.0 else f"scale={factor:g}"


class WindowCache:
    """Fixed perplexity windows, scored once clean (core :func:`window_nll`), keeping the hidden state entering
    each of ``layers``; :meth:`perplexity_under` measures a labelled edit once, starting at its earliest edited
    layer when that layer's clean state was kept (else a full forward: capturing it would cost a pass too).
    Checks that share the windows share every result."""

    def __init__(self, model: LoadedModel, windows: Tensor, layers: Sequence[int] = (), *, batch_size: int = 4,
                 layer_skip: bool = True) -> None:
        self.model, self.windows, self.batch_size, self.layer_skip = model, windows, batch_size, layer_skip
        self.hidden: dict[int, list[Tensor]] = {}
        self.clean_nll = self._clean_run([layer for layer in layers if layer > 0 and layer_skip])  # (n,)
        self._perplexity: dict[str, float] = {UNEDITED: self.perplexity(self.clean_nll)}

    def _clean_run(self, layers: Sequence[int]) -> Tensor:
        """Score the windows unedited, keeping the hidden state entering each of ``layers``."""
        kept: dict[int, list[Tensor]] = {layer: [] for layer in set(layers)}

        def keep_hidden(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
            out = self.model.model(input_ids=input_ids, output_hidden_states=bool(kept), use_cache=False)
            for layer, states in kept.items():
                states.append(out.hidden_states[layer])  # (b, t, hidden)
            return out.logits

        nll = window_nll(self.model.model, self.windows, batch_size=self.batch_size, forward=keep_hidden)
        self.hidden.update(kept)
        return nll

    def nll(self, start_layer: int) -> Tensor:
        """Summed NLL per window under the active edits, all at layers ≥ ``start_layer`` (a full forward when that
        layer's clean hidden state was not captured)."""
        if start_layer not in self.hidden:
            return window_nll(self.model.model, self.windows, batch_size=self.batch_size)
        batches = iter(self.hidden[start_layer])
        plain = model_forward(self.model.model)

        def forward(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
            with start_at_layer(self.model.adapter, start_layer, next(batches)):
                return plain(input_ids, attention_mask)

        return window_nll(self.model.model, self.windows, batch_size=self.batch_size, forward=forward)

    def perplexity(self, nll: Tensor) -> float:
        return perplexity_from_nll(nll, self.windows)[0]

    def perplexity_under(self, label: str, start_layer: int, edit: Condition) -> float:
        """The perplexity with ``edit`` in force (its earliest edited layer ``start_layer``), measured once per
        ``label``; ``label`` must name the edit uniquely (:data:`UNEDITED` is the clean run)."""
        if label not in self._perplexity:
            with edit():
                self._perplexity[label] = self.perplexity(self.nll(start_layer))
        return self._perplexity[label]
