"""Render the self-contained HTML report from plain records with Jinja2 (autoescaping everywhere)."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from reports.atomic import write_text_atomic
from reports.records import AuditRecord, RunInfo, counts, to_jsonable, verdict

AREA_TITLES = {
    "model": "Model and evaluation",
    "superweights": "Super weights",
    "quantization": "Quantization",
    "arithmetic": "Arithmetic heads and neurons",
    "bias": "Gender bias",
    "other": "Other audits",
}


def environment() -> Environment:
    # autoescape=True for every template: model tokens and prompts can contain <script>.
    return Environment(
        loader=PackageLoader("reports", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(records: list[AuditRecord], run: RunInfo) -> str:
    areas: dict[str, list[AuditRecord]] = {}
    for record in records:
        areas.setdefault(record.area if record.area in AREA_TITLES else "other", []).append(record)
    template = environment().get_template("report.html.j2")
    return template.render(
        verdict=verdict(records),
        counts=counts(records),
        records=records,
        areas=[(AREA_TITLES[a], areas[a]) for a in AREA_TITLES if a in areas],
        run=to_jsonable(run),
    )


def write_html_report(path: Path, records: list[AuditRecord], run: RunInfo) -> Path:
    return write_text_atomic(path, render_html(records, run))
