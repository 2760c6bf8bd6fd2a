"""Zero-shot accuracy through lm-eval on local task files, under lmaudit's one BOS policy.

Tasks (:func:`zero_shot_tasks`): ``arithmetic`` (the harness's one-digit ``+`` and ``−`` problems, written once
under the cache) and, when the shared data folder holds them, ``arc_easy``, ``arc_challenge``, ``piqa`` and
``lambada``; a task whose file is absent is skipped and named in the skipped list. Accuracy is lm-eval's ``acc``:
for multiple choice, the choice with the highest log-likelihood; for ``arithmetic`` and ``lambada``, whether the
whole continuation is the greedy one.

**BOS policy.** Every request lm-eval scores is tokenised the way
:func:`lmaudit.checks.core.logprobs.encode_prompts` tokenises a prompt and
:func:`lmaudit.checks.core.perplexity.corpus_windows` a window: the text without special tokens, with exactly one
BOS in front when the tokenizer defines one. HFLM's own ``add_bos_token=True`` does not do that: it asks the
tokenizer to add its special tokens, and a tokenizer whose template adds none (SmolLM2's) then gets no BOS, so
token 0 of a document would be its first word while token 0 of a perplexity window is BOS. The wrapper here
(:func:`bos_policy_lm`) overrides ``tok_encode``, so every document is scored as ``[BOS] + context +
continuation`` (an empty context: ``[BOS] + continuation``, lm-eval's own prefix). An intervention that acts
at a position therefore meets the same positions in every evaluation.

:class:`ZeroShotScores` keeps each document's 0/1 outcome as well as the accuracies, so that two evaluations of
the same documents (the same model under two interventions) can be compared document by document.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaudit.checks.core.arithmetic_problems import generate_problems, lm_eval_task_dict, write_jsonl
from lmaudit.checks.core.corpora import shared_data_dir
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.lm_eval_bridge import quiet_lm_eval, run_lm_eval_tasks
from lmaudit.checks.core.loading import LoadedModel, cache_root
from lmaudit.checks.core.logprobs import bos_prefix
from lmaudit.reports.atomic import write_text_atomic


@dataclass(frozen=True)
class ZeroShotTask:
    """An lm-eval task config over a local file; ``metric`` is read per document and, with ``,none``, per task."""

    name: str
    config: dict[str, Any]
    metric: str = "acc"


@dataclass(frozen=True)
class ZeroShotScores:
    """Accuracy per task and each document's outcome (1 correct, 0 not), documents in ``doc_id`` order."""

    accuracy: dict[str, float]
    correct: dict[str, tuple[int, ...]]

    @property
    def mean(self) -> float:
        """Mean of the task accuracies (NaN when no task ran)."""
        return sum(self.accuracy.values()) / len(self.accuracy) if self.accuracy else float("nan")

    def outcomes(self) -> tuple[int, ...]:
        """Every document's outcome, task after task (for paired comparisons of two evaluations)."""
        return tuple(v for name in sorted(self.correct) for v in self.correct[name])


# ------------------------------------------------------------------------------------------------ tasks


def _shared_file(*parts: str) -> Path | None:
    root = shared_data_dir()
    path = root.joinpath(*parts) if root else None
    return path if path is not None and path.is_file() else None


def _json_task(name: str, path: Path, **fields: Any) -> dict[str, Any]:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "num_fewshot": 0, "metadata": {"version": 1.0}, **fields}


_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_MC = {"output_type": "multiple_choice", "target_delimiter": " ", "metric_list": _ACC}


def _arithmetic(seed: int) -> ZeroShotTask:
    path = cache_root() / "tasks" / f"arithmetic-add-sub-1digit-seed{seed}.jsonl"
    if not path.is_file():
        write_jsonl(generate_problems(ops="+-", digits=1, n_per_op=50, template="symbolic", seed=seed), path)
    return ZeroShotTask("arithmetic", lm_eval_task_dict(path, name="lmaudit_arithmetic", output_type="loglikelihood"))


def _arc(split: str) -> Callable[[int], ZeroShotTask | None]:
    def build(seed: int) -> ZeroShotTask | None:
        path = _shared_file(f"arc-{split}", f"arc_{split}.jsonl")
        if path is None:
            return None
        return ZeroShotTask(f"arc_{split}", _json_task(f"lmaudit_arc_{split}", path, doc_to_text="{{query}}\nAnswer:",
                                                       doc_to_target="gold", doc_to_choice="choices", **_MC))

    return build


def _piqa(seed: int) -> ZeroShotTask | None:
    docs, labels = _shared_file("piqa", "valid.jsonl"), _shared_file("piqa", "valid-labels.lst")
    if docs is None or labels is None:
        return None
    merged = cache_root() / "tasks" / "piqa-valid-labelled.jsonl"
    if not merged.is_file():  # the labels live in a separate file: join them once (atomically)
        rows = [dict(json.loads(line), label=int(label)) for line, label in
                zip(docs.read_text().splitlines(), labels.read_text().split(), strict=True)]
        write_text_atomic(merged, "".join(json.dumps(r) + "\n" for r in rows))
    return ZeroShotTask("piqa", _json_task("lmaudit_piqa", merged, doc_to_text="Question: {{goal}}\nAnswer:",
                                           doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}", **_MC))


def _lambada(seed: int) -> ZeroShotTask | None:
    path = _shared_file("lambada", "lambada_test.jsonl")
    if path is None:
        return None
    return ZeroShotTask("lambada", _json_task(
        "lmaudit_lambada", path, output_type="loglikelihood", doc_to_text="{{text.split(' ')[:-1]|join(' ')}}",
        doc_to_target="{{' '+text.split(' ')[-1]}}", target_delimiter="", metric_list=_ACC))


TASK_BUILDERS: dict[str, Callable[[int], ZeroShotTask | None]] = {
    "arithmetic": _arithmetic, "arc_easy": _arc("easy"), "arc_challenge": _arc("challenge"), "piqa": _piqa,
    "lambada": _lambada,
}


def zero_shot_tasks(names: Sequence[str], *, seed: int = 0) -> tuple[list[ZeroShotTask], list[str]]:
    """``(available tasks, skipped names)``: tasks over shared data are skipped when their files are absent."""
    unknown = [n for n in names if n not in TASK_BUILDERS]
    if unknown:
        raise LmAuditError(f"unknown zero-shot task(s) {unknown}; choose from {', '.join(TASK_BUILDERS)}")
    built = {name: TASK_BUILDERS[name](seed) for name in dict.fromkeys(names)}
    return [t for t in built.values() if t is not None], [n for n, t in built.items() if t is None]


# ------------------------------------------------------------------------------------------------ evaluation


@functools.cache
def _bos_policy_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class BosPolicyLM(HFLM):  # type: ignore[misc]
        """HFLM that tokenises every string as ``[BOS] + text`` (the module docstring's BOS policy)."""

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            ids = self.tokenizer.encode(string, add_special_tokens=False)
            if add_special_tokens is not False:  # lm-eval passes False for a continuation after its own prefix
                ids = bos_prefix(self.tokenizer) + ids
            return ids[-left_truncate_len:] if left_truncate_len else ids

    return BosPolicyLM


def bos_policy_lm(model: LoadedModel, *, batch_size: int = 8) -> Any:
    """An lm-eval ``HFLM`` around ``model`` (a deep copy of its tokenizer) that follows the BOS policy. Build it
    once and pass it to :func:`evaluate` under every intervention: it holds the model, not a copy."""
    with quiet_lm_eval():
        return _bos_policy_class()(pretrained=model.model, tokenizer=copy.deepcopy(model.tokenizer),
                                   batch_size=batch_size, device=str(model.adapter.device), add_bos_token=False)


def evaluate(model: LoadedModel, tasks: Sequence[ZeroShotTask], *, limit: int, lm: Any = None) -> ZeroShotScores:
    """Accuracy of the model as it is now (inside any intervention) on the first ``limit`` documents of each task."""
    if not tasks:
        return ZeroShotScores({}, {})
    out = run_lm_eval_tasks(model.model, model.tokenizer, [t.config for t in tasks], limit=limit,
                            lm=lm if lm is not None else bos_policy_lm(model), log_samples=True)
    accuracy, correct = {}, {}
    for task in tasks:
        key = task.config["task"]
        accuracy[task.name] = float(out["results"][key][f"{task.metric},none"])
        samples = sorted(out["samples"][key], key=lambda s: s["doc_id"])
        correct[task.name] = tuple(int(round(float(s[task.metric]))) for s in samples)
    return ZeroShotScores(accuracy, correct)


class ScoreBook:
    """Zero-shot scores of one model under named edits, each measured once on the same documents. Checks that
    compare the same edits (the unedited model, the super weights pruned) share one book through the session.

    ``scores(label, edit)`` runs ``edit()`` (a context manager factory) around :func:`evaluate` the first time a
    label is asked for; the label must name the edit uniquely (``"unedited"`` for no edit)."""

    def __init__(self, model: LoadedModel, tasks: Sequence[ZeroShotTask], *, limit: int) -> None:
        self.model, self.tasks, self.limit = model, tuple(tasks), limit
        self.lm = bos_policy_lm(model) if tasks else None
        self._scores: dict[str, ZeroShotScores] = {}

    def scores(self, label: str, edit: Callable[[], contextlib.AbstractContextManager[Any]]) -> ZeroShotScores:
        if not self.tasks:
            return ZeroShotScores({}, {})
        if label not in self._scores:
            with edit():
                self._scores[label] = evaluate(self.model, self.tasks, limit=self.limit, lm=self.lm)
        return self._scores[label]
