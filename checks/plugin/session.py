"""Per-pytest-session state of the lmaudit plugin: options, the model pool and the collected records."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pytest

from checks.context import AuditContext
from checks.loading import DEFAULT_MODEL, LoadedModel, load_model
from reports.records import AuditRecord, RunInfo


@dataclass
class AuditOptions:
    model: str = DEFAULT_MODEL
    compare_model: str | None = None
    report: Path | None = Path("audit-report.html")
    json: Path | None = None
    profile: str = "full"
    corpus: str = "pydoc"
    corpus_path: str | None = None
    dtype: str = "float32"
    seed: int = 0
    trust_remote_code: bool = False
    report_explicit: bool = False  # --audit-report given: write even when no audit item ran

    @classmethod
    def from_config(cls, config: pytest.Config) -> AuditOptions:
        report = config.getoption("audit_report")
        json_path = config.getoption("audit_json")
        return cls(
            model=config.getoption("audit_model") or DEFAULT_MODEL,
            compare_model=config.getoption("compare_model"),
            report=Path(report or "audit-report.html"),
            json=Path(json_path) if json_path else None,
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
    _models: dict[str, LoadedModel] = field(default_factory=dict)
    _context: AuditContext | None = None

    def load(self, spec: str) -> LoadedModel:
        if spec not in self._models:
            self._models[spec] = load_model(
                spec, dtype=self.options.dtype, trust_remote_code=self.options.trust_remote_code
            )
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
        from checks.perplexity import PERPLEXITY_DEFINITION

        model = self._models.get(self.options.model)
        card = model.card() if model is not None else {"spec": self.options.model, "loaded": False}
        if model is not None:
            card.update(model.adapter.summary())
        corpus = self.options.corpus
        if self._context is not None and ("corpus", corpus, self.options.corpus_path) in self._context._memo:
            corpus = f"{corpus} ({self._context.corpus().source})"
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
        )


def environment_info() -> dict[str, str]:
    info = {"python": platform.python_version(), "machine": f"{platform.machine()} {platform.system()}",
            "cpus": str(os.cpu_count())}
    for dist in ("lmaudit", "torch", "transformers", "lm_eval", "peft", "pytest"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = "not installed"
    return info
