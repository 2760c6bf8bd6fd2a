"""Per-pytest-session state of the lmaudit plugin: options, the model pool, the baseline and the records."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmaudit.checks.core.loading import DEFAULT_MODEL, LoadedModel, load_model
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import BaselineTolerance, compare_to_baseline
from lmaudit.reports.json_results import ResultsFileError, load_results
from lmaudit.reports.records import AuditRecord, RunInfo

if TYPE_CHECKING:
    from lmaudit.checks.plugin.items import Measured


@dataclass
class AuditOptions:
    model: str = DEFAULT_MODEL
    compare_model: str | None = None
    report: Path | None = Path("audit-report.html")
    json: Path | None = None
    baseline: Path | None = None
    profile: str = "full"
    corpus: str = "pydoc"
    corpus_path: str | None = None
    dtype: str = "float32"
    seed: int = 0
    trust_remote_code: bool = False
    report_explicit: bool = False  # --audit-report given: write even when no audit item ran

    @property
    def wants_report(self) -> bool:
        return self.report_explicit or self.json is not None

    @classmethod
    def from_config(cls, config: pytest.Config) -> AuditOptions:
        report = config.getoption("audit_report")
        json_path = config.getoption("audit_json")
        baseline = config.getoption("audit_baseline")
        return cls(
            model=config.getoption("audit_model") or DEFAULT_MODEL,
            compare_model=config.getoption("compare_model"),
            report=Path(report or "audit-report.html"),
            json=Path(json_path) if json_path else None,
            baseline=Path(baseline) if baseline else None,
            profile=config.getoption("audit_profile"),
            corpus=config.getoption("audit_corpus"),
            corpus_path=config.getoption("corpus_path"),
            dtype=config.getoption("audit_dtype"),
            seed=config.getoption("audit_seed"),
            trust_remote_code=config.getoption("trust_remote_code"),
            report_explicit=report is not None,
        )


@dataclass
class AuditSession:
    """Loads each model once per session and collects one record per audit item."""

    options: AuditOptions
    records: list[AuditRecord] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    invocation: list[str] = field(default_factory=list)
    baseline: dict[str, Any] | None = None  # the --audit-baseline results document, when given
    written: list[Path] = field(default_factory=list)  # report files written at the end of the session
    write_errors: list[str] = field(default_factory=list)
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _load_errors: dict[str, str] = field(default_factory=dict)
    _context: AuditContext | None = None

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
            self.baseline = load_results(path)
        except ResultsFileError as exc:
            raise pytest.UsageError(f"--audit-baseline {path}: {exc}") from None
        self._baseline_index = {a["nodeid"]: a for a in self.baseline["audits"]}

    def baseline_record(self, nodeid: str) -> dict[str, Any] | None:
        return None if self.baseline is None else self._baseline_index.get(nodeid)

    def baseline_condition(self, nodeid: str, metric: str, measured: Measured, tolerance: BaselineTolerance) -> None:
        """Add the "no regression vs baseline" comparison of ``metric`` to ``measured`` (or a note without one)."""
        measured.tolerances[metric] = tolerance
        value = measured.metrics[metric]
        if self.baseline is None:
            note = "baseline conditions not checked: no --audit-baseline given"
            if note not in measured.notes:
                measured.notes.append(note)
            return
        old = self.baseline_record(nodeid)
        missing = ""
        if old is None:
            missing = f"audit not in {self.options.baseline}; regenerate it with --audit-json"
        elif metric not in old.get("metrics", {}):
            missing = f"metric not in {self.options.baseline} (baseline status {old.get('status', '?')})"
        baseline_value = old["metrics"].get(metric) if old is not None and not missing else None
        measured.comparisons.append(compare_to_baseline(metric, value, baseline_value, tolerance, missing=missing))

    def load(self, spec: str) -> LoadedModel:
        """Load ``spec`` once per session; a failed load is remembered and re-raised, not retried per item."""
        if spec in self._load_errors:
            from lmaudit.checks.core.errors import ModelLoadError

            raise ModelLoadError(self._load_errors[spec])
        if spec not in self._models:
            try:
                self._models[spec] = load_model(
                    spec, dtype=self.options.dtype, trust_remote_code=self.options.trust_remote_code
                )
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

    def run_info(self, exit_status: int | None) -> RunInfo:
        """Everything the report says about the run. Never raises: a missing piece becomes a note."""
        notes: list[str] = []
        model = self._models.get(self.options.model)
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
        corpus = self.options.corpus + (f" (--corpus-path {self.options.corpus_path})" if self.options.corpus_path else "")
        if self._context is not None and (label := self._context.session_corpus_label()):
            corpus = label
        try:
            from lmaudit.checks.core.perplexity import PERPLEXITY_DEFINITION
        except ImportError as exc:
            PERPLEXITY_DEFINITION = f"(unavailable: {exc})"  # noqa: N806
        return RunInfo(
            model=card,
            environment=environment_info(),
            profile=self.options.profile,
            seed=self.options.seed,
            corpus=corpus,
            perplexity_definition=PERPLEXITY_DEFINITION,
            started=self.started_at,
            duration_s=time.perf_counter() - self.started,
            pytest_exit_status=exit_status,
            invocation=list(self.invocation),
            compare_model=self.options.compare_model,
            baseline=self._baseline_info(card),
            notes=notes,
        )

    def _baseline_info(self, card: dict[str, Any]) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        run = self.baseline.get("run", {})
        old_model = run.get("model", {})
        return {
            "path": str(self.options.baseline),
            "started": run.get("started", ""),
            "verdict": self.baseline.get("verdict", ""),
            "model": old_model.get("spec", ""),
            "content_hash": old_model.get("content_hash", ""),
            "same_weights": bool(card.get("content_hash")) and old_model.get("content_hash") == card.get("content_hash"),
        }


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
