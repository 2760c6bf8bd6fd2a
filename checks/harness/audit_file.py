"""The audit file schema (``audits/*.yaml``) and its strict parser.

An audit file looks like::

    audits:
      - name: perplexity_is_sane
        check: perplexity            # a registered check (its parameters and metrics are validated)
        claim: "..."                 # the paper claim the entry checks (shown in the report)
        params: {seq_len: 256}       # validated against the check's parameter model
        expect:                      # thresholds on the check's metrics
          perplexity: {max: 60}
        baseline:                    # optional: no regression vs --audit-baseline results (see thresholds)
          perplexity: {direction: lower_is_better, rel: 0.05}
        profiles:                    # which --audit-profile runs it (default: both), with per-profile overrides
          quick: {params: {n_windows: 4}}
          full: {}
        xfail: {reason: "...", strict: true}   # a known deviation of the model from the paper

``profiles`` is either a list of profile names or a mapping from profile name to overrides (``params`` and/or
``expect``) merged over the entry's own. A generated pin file (``--audit-pin``, :mod:`lmaudit.checks.harness.pin`)
also has a ``pinned:`` header: which weights and precision its values were measured at, and the deviations of the
hand-written suite it records.

Files are read with ``yaml.safe_load`` semantics only (no tags that run code), and a key repeated in one mapping
is an error naming the file and line. Every problem (unknown check, unknown key, wrong type, unknown metric,
``min > max``) raises :class:`AuditFileError` naming the file, the entry and the key, with the valid names.
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


class ProfileOverride(BaseModel):
    """What one profile changes in an entry: parameters merged over ``params``, thresholds over ``expect``."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(default_factory=dict)
    expect: dict[str, Threshold] = Field(default_factory=dict)


class Xfail(BaseModel):
    """A known deviation of the model under audit from the paper's claim: the entry is expected to miss its
    thresholds. ``strict``: if it passes after all, the run fails and says the model now agrees."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1)
    strict: bool = True


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    check: str
    claim: str = ""
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    expect: dict[str, Threshold] = Field(default_factory=dict)
    baseline: dict[str, BaselineTolerance] = Field(default_factory=dict)
    profiles: list[Profile] | dict[Profile, ProfileOverride | None] = Field(default_factory=lambda: list(PROFILES))
    xfail: Xfail | None = None

    def overrides(self) -> dict[str, ProfileOverride]:
        """Every profile that runs this entry, with its overrides (empty when none)."""
        if isinstance(self.profiles, list):
            return {p: ProfileOverride() for p in self.profiles}
        return {p: o or ProfileOverride() for p, o in self.profiles.items()}


class Deviation(BaseModel):
    """An entry of the hand-written suite that failed its claim on the pinned model: whenever the pin is in the
    run, that entry (``audit``: its key, :func:`lmaudit.checks.harness.baseline.audit_key`) is a strict xfail in
    ``profile``, so the known deviation shows as expected, and a model that starts to agree fails."""

    model_config = ConfigDict(extra="forbid")

    audit: str = Field(pattern=r"^.+::.+$")
    profile: Profile
    reason: str = Field(min_length=1)
    strict: bool = True


class PinHeader(BaseModel):
    """The header of a generated pin file (``--audit-pin``): which weights its values were measured on, at which
    precision, when and how, and the deviations of the hand-written suite it records."""

    model_config = ConfigDict(extra="forbid")

    model: str
    weights: str  # LoadedModel.content_hash: sha256 of the loaded tensors (names, dtypes, shapes, bytes)
    dtype: str = "float32"
    device: str = ""
    date: str = ""
    generated_by: str = ""
    lmaudit: str = ""
    torch: str = ""
    transformers: str = ""
    source: list[str] = Field(default_factory=list)  # the audit files the pin was generated from
    profiles: list[Profile] = Field(default_factory=list)  # the profiles whose values it holds
    not_pinned: list[str] = Field(default_factory=list)  # entries that ran without a value to pin, and why
    deviations: list[Deviation] = Field(default_factory=list)


class AuditFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pinned: PinHeader | None = None
    audits: list[AuditEntry]


@dataclass(frozen=True)
class ResolvedProfile:
    """An entry as one profile runs it: validated parameters and thresholds after the profile's overrides."""

    params: CheckParams
    expect: dict[str, Threshold]


@dataclass(frozen=True)
class ParsedAudit:
    """One validated audit entry, ready to run."""

    path: Path
    entry: AuditEntry
    spec: CheckSpec
    profiles: dict[str, ResolvedProfile]  # only the profiles that run the entry
    pinned: PinHeader | None = None

    def resolve(self, profile: str) -> ResolvedProfile | None:
        return self.profiles.get(profile)


# ---------------------------------------------------------------------------------------- YAML reading


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML silently keeps the last one)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise AuditFileError(f"line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                                 "a repeated key would silently replace the first one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def load_yaml(path: Path) -> Any:
    """Parse ``path`` with safe-load semantics and no duplicate keys; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditFileError(f"{path}: cannot read the audit file: {exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except AuditFileError as exc:
        raise AuditFileError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise AuditFileError(f"{path}: not valid YAML: {exc}") from exc


# ---------------------------------------------------------------------------------------- error messages


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
    if "xfail" in parents[-1:]:
        return "xfail", list(Xfail.model_fields)
    if "pinned" in parents[-1:]:
        return "pin header", list(PinHeader.model_fields)
    if "profiles" in parents:
        return "profile override", list(ProfileOverride.model_fields)
    if parents[-1:] == ["audits"]:
        return "audit entry", _ENTRY_KEYS
    return "audit file", _ROOT_KEYS


def _explain(path: Path, error: ValidationError, raw: Any) -> AuditFileError:
    lines = []
    for problem in error.errors():
        loc = tuple(k for k in problem["loc"] if not (isinstance(k, str) and k.startswith(("list[", "dict["))))
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
    return AuditFileError("\n".join(dict.fromkeys(lines)))


_ENTRY_KEYS = list(AuditEntry.model_fields)
_THRESHOLD_KEYS = list(Threshold.model_fields)
_BASELINE_KEYS = list(BaselineTolerance.model_fields)
_ROOT_KEYS = list(AuditFileModel.model_fields)


def _params(where: str, spec: CheckSpec, values: dict[str, Any]) -> CheckParams:
    try:
        return spec.params.model_validate(values)
    except ValidationError as exc:
        lines = []
        for problem in exc.errors():
            key = ".".join(str(k) for k in problem["loc"])
            msg = problem["msg"]
            if problem["type"] == "extra_forbidden":
                valid = list(spec.params.model_fields)
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean: {close[0]}?" if close else ""
                msg = f"unknown key {key!r} for check {spec.name!r}.{hint} Valid keys: {', '.join(valid) or '(none)'}"
            elif problem["loc"]:
                msg = f"{msg} (got {values.get(problem['loc'][0])!r})"
            lines.append(f"{where}.{key}: {msg}")
        raise AuditFileError("\n".join(lines)) from None


def _check_metrics(where: str, spec: CheckSpec, keys: list[tuple[str, str]]) -> None:
    for key, metric in keys:
        if metric not in spec.metrics:
            close = difflib.get_close_matches(metric, spec.metrics, n=1)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise AuditFileError(f"{where}.{key}.{metric}: check {spec.name!r} has no metric {metric!r}.{hint} "
                                 f"Valid metrics: {', '.join(spec.metrics)}")


def parse_audit_file(path: Path) -> list[ParsedAudit]:
    """Validate ``path`` completely, every profile's parameters included, before anything runs.

    The registry must hold the checks (:func:`lmaudit.checks.catalog.load_checks`)."""
    return parse_audit_document(load_yaml(path), path)


def _document(raw: Any, path: Path) -> AuditFileModel:
    if not isinstance(raw, dict):
        raise AuditFileError(f"{path}: expected a mapping with an 'audits' list at the top level")
    try:
        return AuditFileModel.model_validate(raw)
    except ValidationError as exc:
        raise _explain(path, exc, raw) from None


def parse_audit_document(raw: Any, path: Path) -> list[ParsedAudit]:
    """:func:`parse_audit_file` on an already-loaded YAML document (``path`` names it in errors)."""
    document = _document(raw, path)
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
        overrides = entry.overrides()
        if not overrides:
            raise AuditFileError(f"{where}.profiles: the entry runs in no profile; name at least one of "
                                 f"{', '.join(PROFILES)}")
        _check_metrics(where, spec, [("expect", m) for m in entry.expect] + [("baseline", m) for m in entry.baseline])
        profiles: dict[str, ResolvedProfile] = {}
        for profile, override in overrides.items():
            _check_metrics(f"{where}.profiles.{profile}", spec, [("expect", m) for m in override.expect])
            params = _params(f"{where}.params" if not override.params else f"{where}.profiles.{profile}.params",
                             spec, {**entry.params, **override.params})
            profiles[profile] = ResolvedProfile(params, {**entry.expect, **override.expect})
        parsed.append(ParsedAudit(path, entry, spec, profiles, document.pinned))
    return parsed
