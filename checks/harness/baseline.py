"""Baselines: an earlier results file (``--audit-baseline``), matched audit by audit on a stable key.

An audit's **key** is its file's path relative to the nearest enclosing ``audits`` directory (else the file
name), ``::``, and the entry's name (``superweights.yaml::superweight_found``; a Python audit's test name after
its module). Unlike a pytest node id it does not move with pytest's rootdir, which pytest picks from path-like
option values (``--model ./x``) when no ini file pins it. Results files written before keys existed are matched
through their ``nodeid``, turned into a key the same way.

The "no regression" comparison itself lives in :mod:`lmaudit.checks.harness.thresholds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lmaudit.checks.harness.thresholds import (
    BaselineTolerance,
    Comparison,
    MetricDelta,
    compare_to_baseline,
    metric_delta,
)

AUDITS_DIR = "audits"


def relative_to_audits(path: Path | PurePosixPath) -> str:
    """``path`` relative to its nearest ``audits`` ancestor directory (posix separators), else its file name."""
    parts = path.parts
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == AUDITS_DIR:
            return "/".join(parts[index + 1:])
    return path.name


def audit_key(path: Path, name: str) -> str:
    """The stable key of the audit ``name`` (an entry name, or the test name after the module) in ``path``."""
    return f"{relative_to_audits(path)}::{name}"


def strip_group_suffix(nodeid: str) -> str:
    """A pytest-xdist ``--dist loadgroup`` node id without its ``@group`` suffix (xdist's own rule)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def key_from_nodeid(nodeid: str) -> str:
    """The key of an audit known only by a pytest node id (results files written before keys existed)."""
    file, _, rest = strip_group_suffix(nodeid).partition("::")
    return f"{relative_to_audits(PurePosixPath(file))}::{rest}"


@dataclass
class Baseline:
    """A loaded ``--audit-baseline`` document, indexed by audit key."""

    path: Path
    document: dict[str, Any]
    _index: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for audit in self.document.get("audits", []):
            self._index.setdefault(audit.get("key") or key_from_nodeid(audit["nodeid"]), audit)

    def record(self, key: str) -> dict[str, Any] | None:
        return self._index.get(key)

    def condition(self, key: str, metric: str, value: Any, tolerance: BaselineTolerance) -> Comparison:
        """The "no regression vs baseline" comparison of ``metric`` (failing, with the reason, when the baseline
        lacks the audit or the metric)."""
        old = self.record(key)
        missing = ""
        if old is None:
            missing = f"audit not in {self.path}; regenerate it with --audit-json"
        elif metric not in old.get("metrics", {}):
            missing = f"metric not in {self.path} (baseline status {old.get('status', '?')})"
        baseline_value = old["metrics"].get(metric) if old is not None and not missing else None
        return compare_to_baseline(metric, value, baseline_value, tolerance, missing=missing)

    def deltas(self, key: str, metrics: dict[str, Any],
               tolerances: dict[str, BaselineTolerance]) -> list[MetricDelta]:
        """Every metric also in the baseline's record of this audit, beside its baseline value."""
        old = self.record(key)
        if old is None:
            return []
        return [metric_delta(metric, value, old["metrics"][metric], tolerances.get(metric))
                for metric, value in metrics.items() if metric in old.get("metrics", {})]

    def info(self, content_hash: str | None) -> dict[str, Any]:
        """What the report says about the baseline run, and whether it measured the same weights."""
        run = self.document.get("run", {})
        old_model = run.get("model", {})
        return {
            "path": str(self.path),
            "started": run.get("started", ""),
            "verdict": self.document.get("verdict", ""),
            "model": old_model.get("spec", ""),
            "content_hash": old_model.get("content_hash", ""),
            "same_weights": bool(content_hash) and old_model.get("content_hash") == content_hash,
        }
