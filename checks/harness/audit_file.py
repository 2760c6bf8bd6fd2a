"""The audit file schema (``audits/*.yaml``) and its strict parser.

An audit file looks like::

    model: smollm2-135m-instruct   # optional: the model its pinned values were measured on
    audits:
      - name: perplexity_is_sane
        check: perplexity            # a registered check (``lmaudit checks`` lists them)
        params: {seq_len: 256}       # validated against the check's parameter model
        expect:                      # thresholds on the check's metrics
          perplexity: {max: 60}
        baseline:                    # optional: no regression vs --audit-baseline results (see thresholds)
          perplexity: {direction: lower_is_better, rel: 0.05}
        profiles: [quick, full]      # which --audit-profile runs it (default: both)

Files are read with ``yaml.safe_load`` only. Every problem (unknown check, unknown key, wrong type, unknown
metric) raises :class:`AuditFileError` naming the file, the entry and the key, with the valid names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmaudit.checks.core.errors import AuditFileError
from lmaudit.checks.harness.registry import CheckParams, CheckSpec, get_check
from lmaudit.checks.harness.thresholds import BaselineTolerance, Threshold

Profile = Literal["quick", "full"]
PROFILES: tuple[str, ...] = ("quick", "full")


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    check: str
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    expect: dict[str, Threshold] = Field(default_factory=dict)
    baseline: dict[str, BaselineTolerance] = Field(default_factory=dict)
    profiles: list[Profile] = Field(default_factory=lambda: list(PROFILES))


class AuditFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    audits: list[AuditEntry]


@dataclass(frozen=True)
class ParsedAudit:
    """One validated audit entry, ready to run."""

    path: Path
    entry: AuditEntry
    spec: CheckSpec
    params: CheckParams
    pinned_model: str | None


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for key in loc:
        if isinstance(key, int):
            name = node[key].get("name") if isinstance(node, list) and isinstance(node[key], dict) else None
            parts.append(f"[{key}]" + (f" (name {name!r})" if name else ""))
        else:
            parts.append(f".{key}" if parts else str(key))
        node = node[key] if isinstance(node, (dict, list)) and _has(node, key) else None
    return "".join(parts)


def _has(node: Any, key: Any) -> bool:
    return (isinstance(node, dict) and key in node) or (isinstance(node, list) and isinstance(key, int) and key < len(node))


def _valid_keys_for(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """Which mapping an unknown key at ``loc`` sits in, and that mapping's valid keys."""
    parents = [k for k in loc[:-1] if isinstance(k, str)]
    if len(loc) >= 3 and loc[-3] == "expect":
        return "threshold", _THRESHOLD_KEYS
    if len(loc) >= 3 and loc[-3] == "baseline":
        return "baseline tolerance", _BASELINE_KEYS
    if parents[-1:] == ["audits"]:
        return "audit entry", _ENTRY_KEYS
    return "audit file", _ROOT_KEYS


def _explain(path: Path, error: ValidationError, raw: Any) -> AuditFileError:
    lines = []
    for problem in error.errors():
        loc = problem["loc"]
        where = _where(loc, raw)
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            kind, valid = _valid_keys_for(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            message = f"unknown key {loc[-1]!r} in {kind}.{hint} Valid keys: {', '.join(valid)}"
        elif "input" in problem and not isinstance(problem["input"], (dict, list)):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"{path}: {where}: {message}")
    return AuditFileError("\n".join(lines))


_ENTRY_KEYS = list(AuditEntry.model_fields)
_THRESHOLD_KEYS = list(Threshold.model_fields)
_BASELINE_KEYS = list(BaselineTolerance.model_fields)
_ROOT_KEYS = list(AuditFileModel.model_fields)


def parse_audit_file(path: Path) -> list[ParsedAudit]:
    """Validate ``path`` completely; the first problem found in each entry is reported together."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AuditFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise AuditFileError(f"{path}: expected a mapping with an 'audits' list at the top level")
    try:
        document = AuditFileModel.model_validate(raw)
    except ValidationError as exc:
        raise _explain(path, exc, raw) from None
    parsed: list[ParsedAudit] = []
    seen: set[str] = set()
    for index, entry in enumerate(document.audits):
        where = f"{path}: audits[{index}] (name {entry.name!r})"
        if entry.name in seen:
            raise AuditFileError(f"{where}.name: duplicate audit name {entry.name!r}")
        seen.add(entry.name)
        try:
            spec = get_check(entry.check)
        except AuditFileError as exc:
            raise AuditFileError(f"{where}.check: {exc}") from None
        try:
            params = spec.params.model_validate(entry.params)
        except ValidationError as exc:
            raw_params = raw["audits"][index].get("params") or {}
            lines = []
            for problem in exc.errors():
                key = ".".join(str(k) for k in problem["loc"])
                msg = problem["msg"]
                if problem["type"] == "extra_forbidden":
                    valid = list(spec.params.model_fields)
                    close = difflib.get_close_matches(key, valid, n=1)
                    hint = f" Did you mean: {close[0]}?" if close else ""
                    msg = f"unknown key {key!r} for check {spec.name!r}.{hint} Valid keys: {', '.join(valid) or '(none)'}"
                else:
                    msg = f"{msg} (got {raw_params.get(problem['loc'][0])!r})" if problem["loc"] else msg
                lines.append(f"{where}.params.{key}: {msg}")
            raise AuditFileError("\n".join(lines)) from None
        for key, metric in [("expect", m) for m in entry.expect] + [("baseline", m) for m in entry.baseline]:
            if metric not in spec.metrics:
                close = difflib.get_close_matches(metric, spec.metrics, n=1)
                hint = f" Did you mean: {close[0]}?" if close else ""
                raise AuditFileError(
                    f"{where}.{key}.{metric}: check {spec.name!r} has no metric {metric!r}.{hint} "
                    f"Valid metrics: {', '.join(spec.metrics)}"
                )
        parsed.append(ParsedAudit(path, entry, spec, params, document.model))
    return parsed
