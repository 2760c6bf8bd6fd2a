"""Render the self-contained HTML report from plain records with Jinja2 (autoescaping everywhere).

One page: verdict line (with the number of claims checked, the audits that did not run and what the verdict
means), summary table, model card, environment, corpus and perplexity definition, the
baseline comparison (when a baseline was given), timings, then one section per area with each audit's
evidence. Each audit's evidence is its section partial ``templates/sections/<ResultType>.html.j2`` when one
exists, else the generic view of its result (:mod:`lmaudit.reports.sections`), followed by its registered charts
(:mod:`lmaudit.reports.charts`). A partial or chart that fails shows its error in place; the report is still written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    TemplateNotFound,
)
from markupsafe import Markup

from lmaudit.reports.atomic import write_text_atomic
from lmaudit.reports.charts import Chart, load_chart_modules, render_charts
from lmaudit.reports.records import (
    VERDICTS,
    AuditRecord,
    RunInfo,
    claims_checked,
    counts,
    regressions,
    to_jsonable,
    verdict,
    verdict_line,
)
from lmaudit.reports.sections import Node, fmt, generic_view

AREA_TITLES = {
    "model": "Model and evaluation",
    "superweights": "Super weights",
    "quantization": "Quantization",
    "arithmetic": "Arithmetic heads and neurons",
    "bias": "Gender bias",
    "other": "Other audits",
}
_NAME = re.compile(r"[A-Za-z_]\w*")


def environment(template_dirs: Sequence[Path] = ()) -> Environment:
    """``template_dirs`` come first, so a team can add or override section partials without editing lmaudit."""
    loaders = [FileSystemLoader([str(d) for d in template_dirs])] if template_dirs else []
    env = Environment(
        loader=ChoiceLoader([*loaders, PackageLoader("lmaudit.reports", "templates")]),
        autoescape=True,  # for every template, partials included: model tokens and prompts can contain <script>
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["generic"] = generic_view
    return env


def anchor(nodeid: str) -> str:
    return "audit-" + re.sub(r"[^A-Za-z0-9_-]+", "-", nodeid).strip("-")


@dataclass(frozen=True)
class RecordView:
    """A record with what the template needs beside it: anchor, evidence (partial or generic) and charts."""

    r: AuditRecord
    anchor: str
    partial: Markup | None
    generic: Node | None
    charts: list[Chart]
    notes: list[str]


def _evidence(env: Environment, record: AuditRecord) -> RecordView:
    notes: list[str] = []
    partial = None
    if record.result_type and _NAME.fullmatch(record.result_type):
        try:
            template = env.get_template(f"sections/{record.result_type}.html.j2")
        except TemplateNotFound:
            template = None
        if template is not None:
            try:
                partial = Markup(template.render(record=record, result=record.result))
            except Exception as exc:  # noqa: BLE001  (a broken partial falls back to the generic view)
                notes.append(f"section template for {record.result_type} failed: {type(exc).__name__}: {exc}")
    generic = generic_view(record.result) if partial is None and record.result else None
    charts = render_charts(record.result_type, record.result) if record.result_type and record.result else []
    return RecordView(record, anchor(record.nodeid), partial, generic, charts, notes)


def render_html(records: list[AuditRecord], run: RunInfo, *, template_dirs: Sequence[Path] = ()) -> str:
    env = environment(template_dirs)
    views = [_evidence(env, record) for record in records]
    areas: dict[str, list[RecordView]] = {area: [] for area in AREA_TITLES}
    for view in views:
        areas[view.r.area if view.r.area in AREA_TITLES else "other"].append(view)
    shown_areas = [(key, AREA_TITLES[key], items) for key, items in areas.items() if items or key != "other"]
    slowest = max((r.duration_s for r in records), default=0.0) or 1.0
    template = env.get_template("report.html.j2")
    outcome = verdict(records, run)
    return template.render(
        verdict=outcome,
        verdict_line=verdict_line(records, run),
        verdict_meaning=VERDICTS[outcome],
        verdicts=VERDICTS,
        claims_checked=claims_checked(records),
        counts=counts(records),
        regressions=regressions(records),
        views=views,
        areas=shown_areas,
        timings=sorted(views, key=lambda v: -v.r.duration_s),
        slowest=slowest,
        baseline_rows=[(v, d) for v in views for d in v.r.baseline_deltas],
        run=to_jsonable(run),
        chart_errors=load_chart_modules(),
    )


def write_html_report(path: Path, records: list[AuditRecord], run: RunInfo, **options: Any) -> Path:
    """Render, then write atomically (a temporary file in the same directory, then a rename)."""
    return write_text_atomic(path, render_html(records, run, **options))
