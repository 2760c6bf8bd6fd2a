"""Batched, model-agnostic log-probabilities and greedy answers for any Hugging Face causal LM.

Every function takes a ``model`` and its ``tokenizer`` (no adapter) and returns tensors on the CPU.

**BOS policy** (one place: :func:`encode_prompts`). A prompt is tokenised *without* the tokenizer's special
tokens and, when the tokenizer defines a BOS token, exactly one ``bos_token_id`` is prepended, whether or not
the tokenizer would add it by itself. So SmolLM2 (whose tokenizer adds no BOS, bos id 1) and Llama-style
tokenizers (which add one) both see ``[BOS] + prompt``; a tokenizer with no BOS (Qwen2) sees the prompt alone.
This is also lm-eval's convention for scoring from an empty context (``HFLM.prefix_token_id``) and the one
:mod:`lmaudit.checks.core.perplexity` uses for its windows.

**Continuations** are tokenised separately, without special tokens, and appended to the prompt's tokens:
``ids = encode_prompts([prompt])[0] + tokenizer(continuation).input_ids``. The caller puts any leading space
in the continuation (``"3 plus 5 is"`` + ``" 8"``, ``"3+5="`` + ``"8"``; see :mod:`lmaudit.checks.core.arithmetic_problems`).
For a byte-level BPE tokenizer (GPT-2, SmolLM2, Llama-3) this is the usual tokenisation of a prompt ending at
a word boundary; a SentencePiece tokenizer may tokenise ``prompt + continuation`` differently as one string.

**Padding.** Batches are right-padded and each row is read at its own last real position, so a row's logits do
not depend on what else is in the batch (causal attention never looks right), up to float rounding of a
different batch shape (< 1e-5 here). Prompts are sorted by length before batching to waste little padding.

**Interventions.** Each function calls ``forward(input_ids, attention_mask) -> logits (batch, seq, vocab)``;
by default :func:`model_forward`, i.e. ``model(input_ids=..., attention_mask=..., use_cache=False).logits``.
Nothing is cached across calls, so a call inside ``with ablate_heads(...):`` (or any context manager the
caller holds) sees the edited model; pass another ``forward`` (e.g. one that runs inside ``start_at_layer``)
for evaluations that are not a plain model call. Logits are read in float32; any NaN or inf among the logits
that are used raises :class:`~lmaudit.checks.core.errors.NonFiniteOutputError`, naming the first module (layer)
whose output was non-finite when the adapter knows the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lmaudit.checks.core.errors import LmAuditError, NonFiniteOutputError, UnsupportedArchitectureError
from lmaudit.checks.core.finite import all_finite, describe_nonfinite
from lmaudit.checks.core.hooks import locate_nonfinite

__all__ = [
    "Forward",
    "LogprobsError",
    "answer_is_greedy",
    "bos_prefix",
    "check_finite",
    "continuation_logprob",
    "encode_continuations",
    "encode_prompts",
    "greedy_answers",
    "greedy_exact_match",
    "model_forward",
    "next_token_logprobs",
    "right_pad",
]

Forward = Callable[
    [Tensor, "Tensor | None"], Tensor
]  # (input_ids (b, t), attention_mask (b, t) | None) -> logits
DEFAULT_BATCH_SIZE = 32  # prompts of a few dozen tokens: ~0.3 s per batch for a 135M model on 2 cores
DEFAULT_STOP = ("\n",)  # as lm-eval's generate_until tasks of lmaudit.checks.core.arithmetic_problems


class LogprobsError(LmAuditError, ValueError):
    """Bad arguments: mismatched lengths, an empty prompt with no BOS to condition on, an empty answer."""


# ------------------------------------------------------------------------------------------- tokenisation


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[tokenizer.bos_token_id]`` when the tokenizer defines a BOS token, else ``[]`` (the BOS policy)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt under the BOS policy: ``[BOS] + ids(prompt)``, or ``ids(prompt)`` without BOS.

    Raises :class:`LogprobsError` for a prompt that encodes to nothing (an empty prompt without a BOS token):
    there is no position to predict from.
    """
    prefix = bos_prefix(tokenizer)
    encoded = [prefix + ids for ids in _tokenize(tokenizer, prompts)]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise LogprobsError(
            f"prompt(s) at index {empty[:5]} encode to no tokens and the tokenizer has no BOS"
        )
    return encoded


def encode_continuations(tokenizer: PreTrainedTokenizerBase, continuations: Sequence[str]) -> list[list[int]]:
    """Token ids of each continuation, tokenised on its own without special tokens; each must be non-empty."""
    encoded = _tokenize(tokenizer, continuations)
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise LogprobsError(f"continuation(s) at index {empty[:5]} encode to no tokens")
    return encoded


# ------------------------------------------------------------------------------------------- forward passes


def model_forward(model: nn.Module) -> Forward:
    """The plain forward: ``model(input_ids, attention_mask, use_cache=False).logits`` (no KV cache kept)."""

    def forward(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return forward


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_finite(logits: Tensor, what: str, *, model: nn.Module | None = None,
                 rerun: Callable[[], object] | None = None) -> None:
    """Raise :class:`NonFiniteOutputError` naming ``what`` if ``logits`` holds a NaN or an inf.

    With ``model`` and ``rerun`` (a callable that repeats the forward pass that produced ``logits``), the error
    also names the first module whose output was non-finite (:func:`~lmaudit.checks.core.hooks.locate_nonfinite`:
    the pass runs once more, only on this error path).
    """
    if all_finite(logits):
        return
    where = None
    if model is not None and rerun is not None:
        from lmaudit.checks.core.adapter import adapter_for

        try:
            where = locate_nonfinite(adapter_for(model), rerun)
        except UnsupportedArchitectureError:
            where = None  # the adapter cannot name this architecture's layers; say what is known
    detail = (f"the first non-finite output: {where}" if where else
              "check the weights and any intervention in effect, or use dtype float32")
    raise NonFiniteOutputError(
        f"{what}: the model produced non-finite logits ({describe_nonfinite(logits)}); {detail}"
    )


def right_pad(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids (b, t), attention_mask (b, t), lengths (b,))``, right-padded with id 0 (not attended)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    return ids.to(device), mask.to(device), lengths


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first); every index appears once."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LogprobsError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _same_length(prompts: Sequence[str], other: Sequence[str], name: str) -> None:
    if isinstance(prompts, str) or isinstance(other, str):
        raise LogprobsError(f"pass lists of strings, not a single string, for prompts and {name}")
    if len(prompts) != len(other):
        raise LogprobsError(f"{len(prompts)} prompts but {len(other)} {name}")


# ------------------------------------------------------------------------------------------ log-probabilities


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forward: Forward | None = None,
) -> Tensor:
    """``log softmax(logits)`` at the last token of each prompt: ``(n_prompts, vocab)`` float32, CPU.

    Row i is ``log p(· | encode_prompts(prompts)[i])``.
    """
    if isinstance(prompts, str):
        raise LogprobsError("pass a list of prompts, not a single string")
    forward = forward or model_forward(model)
    seqs = encode_prompts(tokenizer, prompts)
    device = _device(model)
    out: Tensor | None = None
    for index in _batches([len(s) for s in seqs], batch_size):
        ids, mask, lengths = right_pad([seqs[i] for i in index], device)
        logits = forward(ids, mask)  # (b, t, vocab)
        last = logits[torch.arange(len(index)), (lengths - 1).to(logits.device)].float().cpu()  # (b, vocab)
        check_finite(last, "next_token_logprobs", model=model, rerun=partial(forward, ids, mask))
        if out is None:
            out = torch.empty(len(seqs), last.shape[-1])
        out[index] = torch.log_softmax(last, dim=-1)
    return out if out is not None else torch.empty(0, 0)


def _score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int,
    forward: Forward | None,
    what: str,
) -> tuple[Tensor, Tensor]:
    """Teacher-forced scores of continuations: ``(Σ log p (n,), every token the argmax (n,) bool)``."""
    _same_length(prompts, continuations, "continuations")
    forward = forward or model_forward(model)
    contexts = encode_prompts(tokenizer, prompts)
    targets = encode_continuations(tokenizer, continuations)
    seqs = [c + t for c, t in zip(contexts, targets, strict=True)]
    device = _device(model)
    total = torch.zeros(len(seqs))
    greedy = torch.zeros(len(seqs), dtype=torch.bool)
    for index in _batches([len(s) for s in seqs], batch_size):
        ids, mask, _ = right_pad([seqs[i] for i in index], device)
        logits = forward(ids, mask)  # (b, t, vocab)
        rows, positions, owner = [], [], []
        for row, i in enumerate(index):
            start, n = len(contexts[i]) - 1, len(targets[i])  # logits at start + j predict target token j
            rows += [row] * n
            positions += range(start, start + n)
            owner += [i] * n
        rows_t, pos_t = torch.tensor(rows), torch.tensor(positions)
        picked = (
            logits[rows_t.to(logits.device), pos_t.to(logits.device)].float().cpu()
        )  # (n_target_tokens, vocab)
        check_finite(picked, what, model=model, rerun=partial(forward, ids, mask))
        wanted = ids[rows_t, pos_t + 1].cpu()  # (n_target_tokens,)
        token_logprob = torch.log_softmax(picked, dim=-1).gather(1, wanted[:, None])[:, 0]
        is_argmax = picked.argmax(dim=-1) == wanted
        owner_t = torch.tensor(owner)
        total.index_add_(0, owner_t, token_logprob)
        misses = torch.zeros(len(seqs), dtype=torch.long).index_add_(0, owner_t, (~is_argmax).long())
        greedy[index] = misses[index] == 0
    return total, greedy


@torch.no_grad()
def continuation_logprob(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forward: Forward | None = None,
) -> Tensor:
    """``log p(continuation | prompt) = Σ_j log p(c_j | prompt, c_<j)`` for each pair: ``(n,)`` float32.

    The full-sequence log-probability of a (possibly multi-token) continuation, tokenised as in the module
    docstring; every continuation must encode to at least one token.
    """
    total, _ = _score(model, tokenizer, prompts, continuations, batch_size, forward, "continuation_logprob")
    return total


@torch.no_grad()
def answer_is_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    forward: Forward | None = None,
) -> Tensor:
    """``(n,)`` bool: every answer token is the argmax given the prompt and the answer tokens before it.

    One teacher-forced forward pass per batch. Precisely: ``answer_is_greedy[i]`` is True iff greedy decoding
    from ``encode_prompts([prompt])`` emits the tokens ``encode_continuations([answer])`` as its first
    ``len(...)`` tokens (ties in the argmax go to the lowest id in both; a near-tie can flip between a batched
    teacher-forced pass and an incremental decode only by float rounding). So, when the model's greedy
    tokens are the tokenizer's own tokenisation of their text (always true for a byte-level tokenizer with
    no merges), ``greedy_exact_match(...)[i]`` is ``answer_is_greedy[i]`` *and* the model stops right after
    the answer (its next generated text starts with a stop string, or it emits EOS).
    """
    _, greedy = _score(model, tokenizer, prompts, answers, batch_size, forward, "answer_is_greedy")
    return greedy


# ------------------------------------------------------------------------------------------- greedy decoding


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _stop_at(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: Sequence[str] = DEFAULT_STOP,
    forward: Forward | None = None,
) -> list[str]:
    """Greedy (argmax) continuation of each prompt, cut before the first stop string (lm-eval ``until``).

    Decoding stops for a row at EOS, when its decoded text contains a stop string, or after ``max_new_tokens``
    tokens; the EOS token is not part of the text. The loop re-runs ``forward`` on the whole right-padded
    sequence at every step (no KV cache), so it works for any ``forward`` and under any intervention; finished
    rows leave the batch. Text is ``tokenizer.decode(new_ids, skip_special_tokens=True)``.
    """
    if isinstance(prompts, str):
        raise LogprobsError("pass a list of prompts, not a single string")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LogprobsError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(stop, str):
        stop = (stop,)
    forward = forward or model_forward(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    seqs = encode_prompts(tokenizer, prompts)
    device = _device(model)
    texts = [""] * len(seqs)
    for index in _batches([len(s) for s in seqs], batch_size):
        generated: dict[int, list[int]] = {i: [] for i in index}
        active = list(index)
        for _ in range(max_new_tokens):
            ids, mask, lengths = right_pad([seqs[i] + generated[i] for i in active], device)
            logits = forward(ids, mask)  # (b, t, vocab)
            last = logits[torch.arange(len(active)), (lengths - 1).to(logits.device)].float()  # (b, vocab)
            check_finite(last, "greedy_answers", model=model, rerun=partial(forward, ids, mask))
            still = []
            for i, token in zip(active, last.argmax(dim=-1).tolist(), strict=True):
                if token == eos:
                    continue
                generated[i].append(token)
                _, stopped = _stop_at(_decode(tokenizer, generated[i]), stop)
                if not stopped:
                    still.append(i)
            active = still
            if not active:
                break
        for i in index:
            texts[i] = _stop_at(_decode(tokenizer, generated[i]), stop)[0]
    return texts


@torch.no_grad()
def greedy_exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: Sequence[str] = DEFAULT_STOP,
    forward: Forward | None = None,
) -> Tensor:
    """``(n,)`` bool: the greedy answer (:func:`greedy_answers`, cut at ``stop``) is exactly ``answers[i]``.

    This is lm-eval's ``generate_until`` + ``exact_match`` without any normalisation: the model must produce
    the whole answer and then stop. ``max_new_tokens`` defaults to the longest answer's token count + 1 (room
    for the stop). See :func:`answer_is_greedy` for the faster teacher-forced test and how the two relate.
    """
    _same_length(prompts, answers, "answers")
    if max_new_tokens is None:
        max_new_tokens = 1 + max((len(ids) for ids in _tokenize(tokenizer, answers)), default=0)
    generated = greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop=stop,
        forward=forward,
    )
    return torch.tensor([g == a for g, a in zip(generated, answers, strict=True)], dtype=torch.bool)
