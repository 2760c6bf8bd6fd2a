"""Run lm-eval (0.4.x) offline on a model already in memory: generic task runs, and a perplexity cross-check.

:func:`run_lm_eval_tasks` wraps the model in ``lm_eval.models.huggingface.HFLM`` and runs
``lm_eval.simple_evaluate`` over task *config dicts* (for example
:func:`lmaudit.checks.core.arithmetic_problems.lm_eval_task_dict`, or a zero-shot multiple-choice task over a local JSONL),
with ``TaskManager(include_defaults=False)`` so that lm-eval never indexes its built-in tasks (~15 s) nor
reaches a hub. lm-eval's INFO/WARNING logging and the datasets progress bars are silenced while it runs; its
global seeding is switched off (it would reseed ``random``, numpy and torch). Side effects of HFLM on what it
is given: ``model.eval()``, ``model.tie_weights()``; the tokenizer is deep-copied first, because HFLM may set
a pad token on it.

:func:`lm_eval_rolling_perplexity` is an independent cross-check of
:data:`lmaudit.checks.core.perplexity.PERPLEXITY_DEFINITION`: it starts from the raw text, not from lmaudit's
windows. lm-eval's own ``HFLM.tok_encode`` tokenises the text, the tokens are cut into ``n_windows`` consecutive
chunks of ``seq_len`` (the definition's windows, built here by separate code), each chunk is decoded and given to
lm-eval's ``loglikelihood_rolling`` as its own document, with ``max_length = seq_len`` and
``add_bos_token=False``. lm-eval then feeds ``[prefix_token_id] + tokens[:-1]`` with every token scored
(``lm_eval.utils.get_rolling_token_windows``), and its ``prefix_token_id`` is the tokenizer's BOS: the same
prefix lmaudit's BOS policy gives every window. A windowing, tokenisation or BOS slip in lmaudit therefore shows
up as a difference instead of being copied into both sides. Token perplexity is
``exp(-Σ loglikelihood / Σ tokens)``. Residual differences:

- re-tokenisation: lm-eval tokenises each decoded chunk again, which need not give back the chunk's tokens (a
  cut inside a multi-byte character, or a non-canonical merge at the cut); the function warns with the count;
- a tokenizer without BOS: lm-eval prefixes EOS and scores every chunk token, lmaudit scores all but the first;
- numerics: batch shapes and summation order differ; float32 rounding only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.perplexity import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_N_WINDOWS,
    DEFAULT_SEQ_LEN,
)

__all__ = ["ROLLING_TASK", "lm_eval_rolling_perplexity", "rolling_task_dict", "run_lm_eval_tasks"]

ROLLING_TASK = "lmaudit_rolling_windows"


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's logger (below ERROR) and the datasets progress bars; restore both on exit."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level = logger.level
    bars = datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def make_hflm(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    **hflm_kwargs: Any,
) -> Any:
    """An ``HFLM`` around the in-memory ``model`` and a deep copy of ``tokenizer``, on the model's device."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    with quiet_lm_eval():
        return HFLM(
            pretrained=model,
            tokenizer=copy.deepcopy(tokenizer),
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            **hflm_kwargs,
        )


def run_lm_eval_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task_dicts: Sequence[Mapping[str, Any]],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 0,
    lm: Any = None,
    hflm_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``model`` on ``task_dicts`` (lm-eval TaskConfig dicts); lm-eval's
    results.

    The returned dict has ``"results"`` (``{task: {"metric,filter": value}}``), ``"configs"``, ``"n-samples"``
    and, with ``log_samples=True``, ``"samples"`` (``{task: [{"doc", "resps", "filtered_resps", ...}]}``).
    ``limit`` caps the documents per task; ``bootstrap_iters=0`` skips lm-eval's bootstrap standard errors.
    Pass ``lm`` to reuse an :func:`make_hflm` (otherwise one is built with ``batch_size``, ``max_length`` and
    ``hflm_kwargs``). Few-shot examples belong in the task config (``num_fewshot``), as in lm-eval.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not task_dicts:
        raise LmAuditError("run_lm_eval_tasks needs at least one task config dict")
    if lm is None:
        lm = make_hflm(
            model, tokenizer, batch_size=batch_size, max_length=max_length, **dict(hflm_kwargs or {})
        )
    with quiet_lm_eval():
        out = simple_evaluate(
            model=lm,
            tasks=[dict(task) for task in task_dicts],
            limit=limit,
            task_manager=TaskManager(include_defaults=False),  # no indexing of the built-in task YAMLs
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=None,  # do not reseed the caller's random / numpy / torch
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    if out is None:
        raise LmAuditError("lm_eval.simple_evaluate returned nothing (a non-zero rank in a distributed run?)")
    return dict(out)


def rolling_task_dict(
    path: str | Path, *, name: str = ROLLING_TASK, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """A ``loglikelihood_rolling`` task over a JSONL file of ``{"text": ...}`` rows (one document per row)."""
    dataset_kwargs: dict[str, Any] = {"data_files": {"test": str(path)}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": dataset_kwargs,
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",  # a column name: the text is used verbatim, no Jinja rendering
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}],
        "metadata": {"version": 1.0},
    }


def lm_eval_rolling_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    n_windows: int = DEFAULT_N_WINDOWS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> float:
    """lm-eval's token perplexity of the first ``n_windows`` chunks of ``seq_len`` tokens of the raw ``text``
    (module docstring). Equals :func:`lmaudit.checks.core.perplexity.perplexity` of the same text up to float
    rounding when lmaudit's windows are right and every decoded chunk re-tokenises to itself."""
    lm = make_hflm(model, tokenizer, batch_size=batch_size, max_length=seq_len, add_bos_token=False)
    ids = list(lm.tok_encode(text))  # lm-eval's tokenisation of the raw text, not lmaudit's corpus_tokens
    if len(ids) < seq_len * n_windows:
        raise LmAuditError(f"the text has {len(ids)} tokens, fewer than {n_windows} chunks of {seq_len}")
    chunks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n_windows)]
    texts = [tokenizer.decode(chunk, clean_up_tokenization_spaces=False) for chunk in chunks]  # verbatim
    counts = [len(lm.tok_encode(t)) for t in texts]
    changed = sum(lm.tok_encode(t) != chunk for t, chunk in zip(texts, chunks, strict=True))
    if changed:
        warnings.warn(
            f"{changed} of {n_windows} chunks do not re-tokenise to the same tokens after decoding; "
            "lm-eval scores slightly different tokens there",
            UserWarning,
            stacklevel=2,
        )
    with tempfile.TemporaryDirectory(prefix="lmaudit-rolling-") as tmp:
        path = Path(tmp) / "chunks.jsonl"
        path.write_text(
            "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
        )
        task = rolling_task_dict(path, cache_dir=Path(tmp) / "hf-datasets")
        out = run_lm_eval_tasks(model, tokenizer, [task], lm=lm, log_samples=True)
    samples = sorted(out["samples"][ROLLING_TASK], key=lambda s: s["doc_id"])
    loglikelihoods = [float(s["filtered_resps"][0]) for s in samples]
    if len(loglikelihoods) != n_windows:
        raise LmAuditError(f"lm-eval scored {len(loglikelihoods)} documents, expected {n_windows}")
    return math.exp(-sum(loglikelihoods) / sum(counts))
