"""A check's parameters from the command line, validated by the check's own pydantic model before any model loads.

A command maps its named flags to parameter names (``--n-windows 2`` -> ``n_windows``) and every command that runs
registered checks also takes ``--param key=value`` for any parameter. Values are read as YAML flow scalars, the way
an audit file's ``params:`` would write them (``--param n_windows=2``, ``--param "scales=[0, 1, 2]"``,
``--param sweep.n_per_op=4`` for a nested model); a parameter declared as a plain string keeps the text as typed
(``--param ops=-``). Precedence, lowest first: the check's defaults, the command's quick-look settings, its named
flags, ``--param``. The same key given by a named flag and by ``--param`` is an error, not a silent choice.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.harness.registry import CheckParams, CheckSpec


class ParamError(LmAuditError):
    """A parameter given on the command line does not fit the check (unknown, malformed or invalid)."""


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b.c=x"]`` -> ``{"a": "1", "b.c": "x"}`` (values still text); a key given twice is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParamError(f"--param {pair!r}: expected key=value, e.g. --param n_windows=2")
        if key in out:
            raise ParamError(f"--param {key} given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _field(model: type[CheckParams], key: str) -> FieldInfo | None:
    """The field ``key`` names (dotted through nested parameter models), or ``None``."""
    *parents, leaf = key.split(".")
    for name in parents:
        annotation = model.model_fields[name].annotation if name in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, CheckParams)):
            return None
        model = annotation
    return model.model_fields.get(leaf)


def _value(model: type[CheckParams], key: str, text: str) -> Any:
    field = _field(model, key)
    if field is not None and field.annotation in (str, str | None):  # kept as typed: "-" is an operation
        return text
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError as exc:
        raise ParamError(f"--param {key}={text}: not a YAML value ({str(exc).splitlines()[0]})") from None


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"sweep.n_per_op": 4}`` -> ``{"sweep": {"n_per_op": 4}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ParamError(f"--param {key}: {parent} is given a value and nested keys")
        node[leaf] = value
    return out


def known(spec: CheckSpec, key: str) -> bool:
    """Whether ``key`` (dotted for nested models) names a parameter of ``spec``."""
    return _field(spec.params, key) is not None


def unknown_key_error(key: str, specs: Sequence[CheckSpec]) -> ParamError:
    names = sorted({name for spec in specs for name in spec.params.model_fields})
    close = difflib.get_close_matches(key.split(".")[-1], names, n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    checks = ", ".join(spec.name for spec in specs)
    return ParamError(f"--param {key}: no such parameter of {checks}.{hint} Valid: {', '.join(names) or 'none'} "
                      "(`lmaudit checks` lists every check's parameters)")


def build_params(spec: CheckSpec, *, quick: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
                 pairs: Mapping[str, str] | None = None) -> CheckParams:
    """The validated parameters of ``spec``: its defaults, then ``quick``, then ``flags`` (named flags given on the
    command line, already typed), then ``pairs`` (``--param``, as text). Keys of ``quick``/``flags``/``pairs``
    that ``spec`` does not take are ignored here: the caller checks that each ``--param`` fits some check."""
    chosen: dict[str, Any] = {k: v for k, v in (quick or {}).items() if known(spec, k)}
    given = {k: v for k, v in (flags or {}).items() if v is not None and known(spec, k)}
    chosen.update(given)
    for key, text in (pairs or {}).items():
        if not known(spec, key):
            continue
        if key in given:
            raise ParamError(f"--param {key} repeats a value its own flag already gives ({given[key]!r})")
        chosen[key] = _value(spec.params, key, text)
    try:
        return spec.params.model_validate(_nest(chosen))
    except ValidationError as exc:
        raise ParamError(f"check {spec.name!r}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """A pydantic error on one line: ``key: message (got value)`` per problem."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "parameters"
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {error['msg']}{shown}")
    return "; ".join(parts)


def defaults(spec: CheckSpec) -> dict[str, Any]:
    """Every parameter of ``spec`` with its default (``"required"`` for those without one), as plain data."""
    out: dict[str, Any] = {}
    for name, field in spec.params.model_fields.items():
        if field.is_required():
            out[name] = "required"
        else:
            value = field.get_default(call_default_factory=True)
            out[name] = value.model_dump(mode="json") if isinstance(value, CheckParams) else value
    return out
