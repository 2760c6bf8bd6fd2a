"""The plugin side of pins (:mod:`lmaudit.checks.harness.pin`): where pins are collected, how their deviations
reach the hand-written entries, what each pinned row says about the weights, and writing a pin at the end.

- Pins live in ``audits/pins/``, which ``pytest audits/`` does not collect: a pin is a regression gate for one
  model, run on purpose with ``--audit-pins DIR_OR_FILE`` or by naming the file (``pytest audits/pins/x.yaml``).
- A pin in the run runs on whatever model is given, never skipped for "another model": each of its rows says
  whether the loaded weights are the pinned ones (content hashes compared), and its deviations turn the matching
  hand-written entries into strict xfails.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from lmaudit.checks.core.errors import AuditFileError
from lmaudit.checks.harness.audit_file import PinHeader, load_yaml, parse_audit_document
from lmaudit.checks.harness.pin import build_pin, render_pin
from lmaudit.reports.atomic import write_text_atomic
from lmaudit.reports.records import to_jsonable

if TYPE_CHECKING:
    from lmaudit.checks.plugin.session import AuditSession

PINS_DIR = "pins"


def add_pin_args(config: pytest.Config, pins: list[Path]) -> None:
    """``--audit-pins`` paths join the collection arguments (once, also in a pytest-xdist worker)."""
    present = {Path(arg.split("::")[0]).resolve() for arg in config.args}
    for path in pins:
        if path.resolve() not in present:
            config.args.append(str(path))


def _pins_root(path: Path) -> Path | None:
    """The ``audits/pins`` directory that ``path`` is or lies in, if any."""
    return next((p for p in (path, *path.parents) if p.name == PINS_DIR and p.parent.name == "audits"), None)


def ignore_pins(collection_path: Path, config: pytest.Config) -> bool | None:
    """A path in ``audits/pins/`` is collected only when a collection argument names it, lies inside it, or lies
    in ``audits/pins/`` and holds it: ``pytest audits/`` does not collect pins, ``pytest audits/pins/`` and
    ``--audit-pins audits/pins/x.yaml`` do."""
    path = collection_path.resolve()
    root = _pins_root(path)
    if root is None:
        return None
    for arg in config.args:
        requested = Path(arg.split("::")[0]).resolve()
        if requested == path or path in requested.parents:
            return None
        if (requested == root or root in requested.parents) and requested in path.parents:
            return None
    return True


def header_info(header: PinHeader, source: str, content_hash: str | None, dtype: str) -> dict[str, Any]:
    """What a pinned row (and the report's pins section) says about the pin and the loaded weights."""
    same = bool(content_hash) and header.weights == content_hash
    return {"file": source, "model": header.model, "weights": header.weights, "dtype": header.dtype,
            "device": header.device, "date": header.date, "profiles": list(header.profiles),
            "same_weights": same, "run_dtype": dtype}


def pin_notes(info: dict[str, Any], content_hash: str | None) -> list[str]:
    if info["same_weights"]:
        notes = [f"pinned on these weights ({info['weights'][:12]}, {info['model']}, {info['date']})"]
    else:
        notes = [f"pinned on other weights: {info['weights'][:12]} ({info['model']}, {info['date']}); the loaded "
                 f"model is {(content_hash or 'unknown')[:12]}, so a failure here is a change between the two"]
    if info["dtype"] and info["dtype"] != info["run_dtype"]:
        notes.append(f"thresholds pinned at {info['dtype']}, measured now at {info['run_dtype']}")
    return notes


def apply_deviations(items: list[pytest.Item], session: AuditSession) -> None:
    """Every deviation recorded by a pin in the run makes its hand-written entry a strict xfail (this profile)."""
    from lmaudit.checks.plugin.items import AuditItem

    deviations = {d.audit: d for header in session.pin_headers.values() for d in header.deviations
                  if d.profile == session.options.profile}
    for item in items:
        if isinstance(item, AuditItem) and item.audit.pinned is None and item.audit.entry.xfail is None:
            deviation = deviations.get(item.key)
            if deviation is not None:
                item.expect_deviation(f"recorded by a pin: {deviation.reason}", strict=deviation.strict)


def write_pin(session: AuditSession, exit_status: int) -> None:
    """``--audit-pin PATH``: the pinned suite of this run, validated, written atomically. A run that did not audit
    the whole selection (interrupted, model not loaded) writes no pin: a pin must not silently lose entries."""
    path = session.options.pin
    if path is None:
        return
    run = session.run_info(exit_status)
    if run.interrupted or run.not_run or run.model.get("load_error") or not run.model.get("content_hash"):
        why = "the run was interrupted" if run.interrupted or run.not_run else "the model did not load"
        session.write_errors.append(f"{path}: pin not written: {why}")
        return
    previous = None
    if path.is_file():
        try:
            previous = load_yaml(path)
        except AuditFileError as exc:
            session.terminal_notes.append(f"replacing unreadable pin {path}: {exc}")
    date = datetime.now(timezone.utc).date().isoformat()
    records = [to_jsonable(r) for r in session.ordered_records()]
    document = build_pin(records, to_jsonable(run), date=date, previous=previous if isinstance(previous, dict) else None)
    text = render_pin(document)
    try:
        parse_audit_document(yaml.safe_load(text), path)  # what is written must collect
        write_text_atomic(path, text)
    except Exception as exc:  # noqa: BLE001  (reported on the terminal, in the report and the exit code)
        session.write_errors.append(f"{path}: pin not written: {type(exc).__name__}: {exc}")
        return
    header = document["pinned"]
    session.terminal_notes.append(
        f"pin written: {path.resolve()} ({len(document['audits'])} entries, {len(header['deviations'])} deviations"
        f"{', ' + str(len(header['not_pinned'])) + ' not pinned' if header['not_pinned'] else ''})")
