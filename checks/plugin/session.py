"""Per-pytest-session state of the lmaudit plugin: the models, the baseline, the selected audits and the records.

In a pytest-xdist run every worker has its own session (it loads the model and runs audits) and the controller's
session only gathers: records and the model-side facts (model card, corpus, precision, cache counts) arrive
attached to the workers' test reports (:mod:`lmaudit.checks.plugin.workers`), so the controller writes one report
exactly as a serial run does.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmaudit.checks.core.loading import LoadedModel, load_model
from lmaudit.checks.harness.audit_file import PinHeader
from lmaudit.checks.harness.baseline import Baseline
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import BaselineTolerance
from lmaudit.checks.plugin.options import AuditOptions
from lmaudit.reports.json_results import ResultsFileError, load_results
from lmaudit.reports.records import AuditRecord, RunInfo

if TYPE_CHECKING:
    from lmaudit.checks.harness.result_cache import ResultCache
    from lmaudit.checks.plugin.items import Measured


@dataclass(frozen=True)
class SelectedAudit:
    """An audit selected to run (collected, not deselected): what the report lists if it never finishes."""

    nodeid: str
    key: str
    name: str
    source: str


@dataclass
class AuditSession:
    """Loads each model once per session and collects one record per audit item."""

    options: AuditOptions
    invocation: list[str] = field(default_factory=list)
    worker: str | None = None  # this process's pytest-xdist worker id ("gw0"), None in a serial run or controller
    n_workers: int = 0  # workers of the run, seen from a worker (for one GPU per worker)
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    baseline: Baseline | None = None
    records: dict[str, AuditRecord] = field(default_factory=dict)  # by node id, in arrival order
    selected: list[SelectedAudit] = field(default_factory=list)  # in collection order
    running: dict[str, str] = field(default_factory=dict)  # node id -> worker id ("" serial), started, no record
    collection_errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    written: list[Path] = field(default_factory=list)  # report files written at the end of the session
    write_errors: list[str] = field(default_factory=list)
    terminal_notes: list[str] = field(default_factory=list)  # extra lines for the terminal summary
    sent_selection: bool = False  # a worker sends its selected audits with its first record
    final_run: RunInfo | None = None  # the run info the report files were written with
    remote_facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker id -> its model-side facts
    pin_headers: dict[str, PinHeader] = field(default_factory=dict)  # pin file (as the report names it) -> header
    result_cache: ResultCache | None = None
    _cache_material: dict[str, Any] | None = None
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _load_errors: dict[str, str] = field(default_factory=dict)
    _context: AuditContext | None = None

    # ------------------------------------------------------------------ baseline

    def load_baseline(self) -> None:
        """Read ``--audit-baseline``; a missing or malformed file is a usage error, before anything runs."""
        path = self.options.baseline
        if path is None:
            return
        if not path.is_file():
            raise pytest.UsageError(
                f"--audit-baseline {path}: no such file. Write one from a trusted run with --audit-json {path}."
            )
        try:
            self.baseline = Baseline(path, load_results(path))
        except ResultsFileError as exc:
            raise pytest.UsageError(f"--audit-baseline {path}: {exc}") from None

    def baseline_condition(self, key: str, metric: str, measured: Measured, tolerance: BaselineTolerance) -> None:
        """Add the "no regression vs baseline" comparison of ``metric`` to ``measured`` (or a note without one)."""
        measured.tolerances[metric] = tolerance
        if self.baseline is None:
            note = "baseline conditions not checked: no --audit-baseline given"
            if note not in measured.notes:
                measured.notes.append(note)
            return
        measured.comparisons.append(self.baseline.condition(key, metric, measured.metrics[metric], tolerance))

    # ------------------------------------------------------------------ models

    def device(self) -> str:
        """``--device``, with ``auto`` resolved: a GPU when there is one (worker N of a pytest-xdist run takes
        GPU N modulo the count, so each worker has its own), else the CPU. MPS is used only when asked for."""
        if self.options.device != "auto":
            return self.options.device
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        count = torch.cuda.device_count()
        index = int(self.worker.removeprefix("gw")) % count if self.worker and self.worker[2:].isdigit() else 0
        return f"cuda:{index}"

    def placement(self) -> dict[str, Any]:
        """The loader's placement arguments for this process."""
        if self.options.device_map is not None:
            return {"device_map": self.options.device_map}
        return {"device": self.device()}

    def threads(self) -> int | None:
        """CPU threads for this process: ``--audit-threads``, else for a pytest-xdist worker on the CPU its share
        of the cores (two workers with torch's default threads on two cores contend in OpenMP barriers: a forward
        pass measured 50x slower), else ``None`` (torch's default)."""
        if self.options.threads is not None:
            return self.options.threads
        if self.worker is not None and self.options.device_map is None and self.device() == "cpu":
            return worker_threads(os.cpu_count() or 1, self.n_workers)
        return None

    def load(self, spec: str) -> LoadedModel:
        """Load ``spec`` once per session; a failed load is remembered and re-raised, not retried per item."""
        if not self._models and not self._load_errors and (threads := self.threads()) is not None:
            import torch

            torch.set_num_threads(threads)
        if spec in self._load_errors:
            from lmaudit.checks.core.errors import ModelLoadError

            raise ModelLoadError(self._load_errors[spec])
        if spec not in self._models:
            try:
                self._models[spec] = load_model(spec, dtype=self.options.dtype, verify=self.options.verify,
                                                trust_remote_code=self.options.trust_remote_code, **self.placement())
            except Exception as exc:
                self._load_errors[spec] = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
                raise
        return self._models[spec]

    def context(self) -> AuditContext:
        if self._context is None:
            self._context = AuditContext(
                model=self.load(self.options.model),
                corpus_spec=self.options.corpus,
                corpus_path=self.options.corpus_path,
                profile=self.options.profile,
                seed=self.options.seed,
                compare_model_spec=self.options.compare_model,
                load=self.load,
            )
        return self._context

    def cache_material(self) -> dict[str, Any]:
        """The session's part of every result-cache key (:mod:`lmaudit.checks.harness.result_cache`)."""
        if self._cache_material is None:
            from lmaudit.checks.core.corpora import shared_data_dir

            context, options = self.context(), self.options
            compare = None
            if options.compare_model is not None:
                try:
                    compare = self.load(options.compare_model).content_hash
                except Exception as exc:  # noqa: BLE001  (the checks that need it report the error)
                    compare = f"unavailable: {type(exc).__name__}"
            versions = environment_info()
            self._cache_material = {
                "model": context.model.content_hash, "compare_model": compare, "corpus": context.corpus_identity(),
                "data_root": str(shared_data_dir() or ""), "seed": options.seed, "profile": options.profile,
                "precision": {"dtype": options.dtype, **self.placement()},
                "versions": {k: versions[k] for k in ("lmaudit", "torch", "transformers", "lm-eval", "peft")},
            }
        return self._cache_material

    @property
    def has_context(self) -> bool:
        return self._context is not None

    @property
    def model(self) -> LoadedModel | None:
        """The model under audit when it has been loaded in this process."""
        return self._models.get(self.options.model)

    # ------------------------------------------------------------------ records

    def add_record(self, record: AuditRecord) -> None:
        self.records[record.nodeid] = record
        self.running.pop(record.nodeid, None)

    def ordered_records(self) -> list[AuditRecord]:
        """Records in collection order (so a pytest-xdist run lists them as a serial run does)."""
        order = {audit.nodeid: index for index, audit in enumerate(self.selected)}
        return sorted(self.records.values(), key=lambda r: order.get(r.nodeid, len(order)))

    def not_run(self) -> list[dict[str, Any]]:
        """Selected audits without a result, and why."""
        return [{"nodeid": a.nodeid, "key": a.key, "name": a.name, "source": a.source,
                 "reason": "interrupted while running" if a.nodeid in self.running else "did not start"}
                for a in self.selected if a.nodeid not in self.records]

    # ------------------------------------------------------------------ run info

    def local_facts(self) -> dict[str, Any]:
        """What only the process holding the model knows: its card, the corpus, the precision, cache counts.
        Plain data, so a pytest-xdist worker can send it to the controller."""
        notes: list[str] = []
        model = self.model
        card: dict[str, Any] = {"spec": self.options.model, "loaded": False}
        if self.options.model in self._load_errors:
            card["load_error"] = self._load_errors[self.options.model]
        if model is not None:
            card = model.card()
            try:
                summary = model.adapter.summary()
                card.update({k: v for k, v in summary.items() if k not in card})
            except Exception as exc:  # an unsupported architecture still gets its card
                notes.append(f"architecture summary unavailable: {type(exc).__name__}: {exc}")
        corpus = self._corpus_label()
        precision = {"dtype": self.options.dtype, "device": card.get("device") or self.placement().get("device"),
                     "device_map": self.options.device_map, "layer_devices": card.get("layer_devices"),
                     "threads": self._torch_threads()}
        cache = self.result_cache.summary() if self.result_cache is not None else {"enabled": False}
        pins = [self.pin_info(source) for source in self.pin_headers]
        return {"model": card, "corpus": corpus, "precision": precision, "cache": cache, "notes": notes,
                "pins": pins, "worker": self.worker}

    def pin_info(self, source: str) -> dict[str, Any]:
        """A pin in the run, and whether the loaded weights are the pinned ones."""
        from lmaudit.checks.plugin.pins import header_info

        model = self.model
        return header_info(self.pin_headers[source], source, model.content_hash if model is not None else None,
                           self.options.dtype)

    def _torch_threads(self) -> int | None:
        """torch's CPU threads in this process, once torch is in use (the plugin does not import it itself)."""
        import sys

        torch = sys.modules.get("torch")
        return torch.get_num_threads() if torch is not None and self._models else None

    def _corpus_label(self) -> str:
        options = self.options
        label = options.corpus or ("pydoc" if options.corpus_path is None else "")
        label += f" (--corpus-path {options.corpus_path})" if options.corpus_path else ""
        if self._context is not None and (used := self._context.session_corpus_label()):
            return used
        return label.strip()

    def merged_facts(self) -> dict[str, Any]:
        """This process's facts, or (on a pytest-xdist controller) the first worker's that loaded the model."""
        if not self.remote_facts:
            return self.local_facts()
        facts = [self.remote_facts[w] for w in sorted(self.remote_facts)]
        best = next((f for f in facts if f["model"].get("content_hash")), facts[0])
        merged = dict(best)
        merged["cache"] = _sum_cache([f["cache"] for f in facts])
        merged["notes"] = list(dict.fromkeys(n for f in facts for n in f["notes"]))
        merged["pins"] = list({pin["file"]: pin for f in facts for pin in f["pins"]}.values())
        return merged

    def run_info(self, exit_status: int | None, *, complete: bool = True) -> RunInfo:
        """Everything the report says about the run. Never raises: a missing piece becomes a note."""
        facts = self.merged_facts()
        card = facts["model"]
        try:
            from lmaudit.checks.core.perplexity import PERPLEXITY_DEFINITION
        except ImportError as exc:
            PERPLEXITY_DEFINITION = f"(unavailable: {exc})"  # noqa: N806
        return RunInfo(
            model=card,
            environment=dict(environment_info()),
            profile=self.options.profile,
            seed=self.options.seed,
            corpus=facts["corpus"],
            perplexity_definition=PERPLEXITY_DEFINITION,
            started=self.started_at,
            duration_s=time.perf_counter() - self.started,
            pytest_exit_status=exit_status,
            invocation=list(self.invocation),
            compare_model=self.options.compare_model,
            baseline=self.baseline.info(card.get("content_hash")) if self.baseline is not None else None,
            notes=list(facts["notes"]),
            complete=complete,
            interrupted=self.interrupted,
            selected=len(self.selected),
            not_run=self.not_run(),
            collection_errors=list(self.collection_errors),
            write_errors=list(self.write_errors),
            precision=facts["precision"],
            pins=facts["pins"],
            cache=facts["cache"],
            workers=sorted(self.remote_facts),
        )


def worker_threads(cpus: int, workers: int) -> int:
    """A worker's share of the CPU cores (at least one)."""
    return max(1, cpus // max(1, workers))


def _sum_cache(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(summaries[0])
    for key in ("reused", "stored", "shared"):
        if key in merged:
            merged[key] = sum(s.get(key, 0) for s in summaries)
    return merged


@functools.cache
def environment_info() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, and the machine they were measured on."""
    info = {
        "python": platform.python_version(),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()} {platform.release()})",
        "cpus": str(os.cpu_count()),
    }
    for label, dist in (("lmaudit", "lmaudit"), ("torch", "torch"), ("transformers", "transformers"),
                        ("lm-eval", "lm_eval"), ("peft", "peft"), ("pytest", "pytest")):
        try:
            info[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[label] = "not installed"
    return info
