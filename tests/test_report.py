"""The report on its own (no pytest run): escaping, self-containment, section partials, the chart registry,
the generic view, the JSON results and atomic writes."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import lmaudit.reports.charts as charts
from lmaudit.reports.atomic import write_text_atomic
from lmaudit.reports.charts import UnsafeSvgError, chart_for, inline_svg, render_charts
from lmaudit.reports.charts.common import bar_chart, heatmap, line_chart, scatter
from lmaudit.reports.html import render_html
from lmaudit.reports.json_results import ResultsFileError, load_results, write_results_json
from lmaudit.reports.records import AuditRecord, RunInfo
from lmaudit.reports.sections import MAX_ROWS, generic_view

XSS = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@chart_for("XssResult")
def _xss_charts(result: dict) -> list[tuple[str, str]]:
    tokens = [row["token"] for row in result["rows"]]
    return [("scores for " + result["prompt"], bar_chart(tokens, [row["score"] for row in result["rows"]])),
            ("scatter", scatter([1, 2], [2, 1], labels=tokens))]


@chart_for("BrokenResult")
def _broken_chart(result: dict) -> list[tuple[str, str]]:
    raise KeyError("layer_maxima")


@chart_for("UnsafeResult")
def _unsafe_chart(result: dict) -> list[tuple[str, str]]:
    return [("evil", '<svg><image href="https://example.com/x.png"/></svg>')]


def _records() -> list[AuditRecord]:
    xss = AuditRecord(
        nodeid="audits/bias.yaml::tokens", name="tokens", source="audits/bias.yaml", status="failed",
        check="fake", area="bias", message=f"token {XSS} moved", params={"prompt": XSS},
        comparisons=[{"metric": "top_token", "expected": "== 'a'", "measured": XSS, "passed": False,
                      "kind": "threshold", "baseline": None}],
        metrics={"top_token": XSS}, result_type="XssResult",
        result={"prompt": XSS, "rows": [{"token": XSS, "score": 1.0}, {"token": "b", "score": 2.0}]},
    )
    crash = AuditRecord(nodeid="audits/x.yaml::crash", name="crash", source="audits/x.yaml", status="error",
                        message=f"RuntimeError: {XSS}", traceback=f"Traceback (most recent call last):\n  {XSS}",
                        result_type="BrokenResult", result={"x": 1})
    return [xss, crash]


def _run() -> RunInfo:
    return RunInfo(model={"spec": XSS, "content_hash": "0" * 64}, environment={"torch": "2.13.0"},
                   perplexity_definition="mean NLL over windows", corpus="pydoc")


def test_model_text_is_escaped_everywhere_including_chart_labels() -> None:
    html = render_html(_records(), _run())
    assert XSS not in html
    assert "<script" not in html.lower()
    summary = html[html.index('id="summary"'):html.index('id="model-card"')]
    assert ESCAPED in summary  # the measured token and the message
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(svgs) == 2 and all(ESCAPED in svg for svg in svgs)
    assert html.count(ESCAPED) >= 8  # card, summary, params, metrics, generic table, chart title, traceback


def test_report_is_self_contained() -> None:
    html = render_html(_records(), _run())
    assert not re.search(r"https?://|<link|<img|<iframe|\ssrc=", html, re.I)
    assert set(re.findall(r'href="([^"#][^"]*)"', html)) <= set(), "only in-page anchors"
    assert not re.search(r"url\((?!#)", html)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_failing_and_unsafe_charts_show_their_error_in_place() -> None:
    html = render_html(_records(), _run())
    assert re.search(r"chart failed: [\w.]*_broken_chart raised KeyError: &#39;layer_maxima&#39;", html)
    [unsafe] = render_charts("UnsafeResult", {})
    assert unsafe.svg is None and "reference outside the document" in unsafe.error


@pytest.mark.parametrize("svg", [
    "<svg><script>alert(1)</script></svg>",
    '<svg><rect onload="alert(1)"/></svg>',
    '<svg><a href="javascript:alert(1)"><text>x</text></a></svg>',
    '<svg><use xlink:href="http://evil/x.svg#a"/></svg>',
    '<svg><rect style="fill: url(http://evil/p)"/></svg>',
    "<svg><foreignObject><div>x</div></foreignObject></svg>",
    "<div>not svg</div>",
])
def test_inline_svg_rejects_code_and_outside_references(svg: str) -> None:
    with pytest.raises(UnsafeSvgError):
        inline_svg(svg)


def test_common_charts_are_clean_inline_svg() -> None:
    made = [
        bar_chart(["a", "b", XSS], [1, 2, 3], highlight=[2], log_y=True),
        line_chart([1, 10, 100], {"clean": [3, 2, 1], XSS: [1, 2, float("nan")]}, log_x=True, hline=2),
        heatmap([[0.0, 1.0], [-1.0, 2.0]], row_labels=["L0", "L1"], col_labels=["h0", XSS], center_zero=True),
        scatter([1, 2, 3], [3, 1, 2], labels=["p", XSS, "q"], diagonal=True),
    ]
    for svg in made:
        markup = str(inline_svg(svg))
        assert markup.startswith("<svg") and "http" not in markup and "<?xml" not in markup
        assert ESCAPED in markup and XSS not in markup
        ET.fromstring(markup.replace("xlink:href", "href"))  # well-formed XML without the namespace prefix


def test_chart_modules_in_the_package_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zz_probe.py").write_text(
        "from lmaudit.reports.charts import chart_for\n"
        "from lmaudit.reports.charts.common import bar_chart\n"
        "@chart_for('ProbeResult')\n"
        "def probe(result):\n    return [('probe', bar_chart(['a'], [result['v']]))]\n")
    (tmp_path / "zz_broken.py").write_text("raise ImportError('needs a missing library')\n")
    monkeypatch.setattr(charts, "__path__", [*charts.__path__, str(tmp_path)])
    monkeypatch.setattr(charts, "_loaded", False)
    errors = charts.load_chart_modules()
    assert errors["zz_broken"] == "ImportError: needs a missing library"
    [chart] = render_charts("ProbeResult", {"v": 1.0})
    assert chart.title == "probe" and chart.svg is not None
    record = AuditRecord(nodeid="a::b", name="b", source="a", status="passed", result_type="ProbeResult",
                         result={"v": 2.0})
    html = render_html([record], _run())
    assert "chart module <code>zz_broken</code> failed to import" in html and "<figcaption>probe</figcaption>" in html


def test_section_partial_is_used_when_present_and_falls_back_when_broken(tmp_path: Path) -> None:
    sections = tmp_path / "sections"
    sections.mkdir()
    (sections / "XssResult.html.j2").write_text(
        '{% import "sections/_macros.html.j2" as lm %}<div id="custom">{{ result.prompt }}</div>'
        "{{ lm.table(result.rows) }}")
    (sections / "BrokenResult.html.j2").write_text("{{ result.missing.deeper }}")
    html = render_html(_records(), _run(), template_dirs=[tmp_path])
    assert f'<div id="custom">{ESCAPED}</div>' in html and XSS not in html
    assert "section template for BrokenResult failed: UndefinedError" in html
    assert "evidence (BrokenResult)" in html  # the generic view replaced it


def test_generic_view_truncates_and_tabulates() -> None:
    rows = [{"layer": i, "channel": 7, "value": i / 3} for i in range(120)]
    node = generic_view({"rows": rows, "vector": list(range(1000)), "text": "x" * 5000, "nested": {"a": {"b": [1]}}})
    kv = dict(node.items)
    assert kv["rows"].kind == "table" and len(kv["rows"].rows) == MAX_ROWS
    assert kv["rows"].columns == ["layer", "channel", "value"] and kv["rows"].text == "showing 50 of 120"
    assert kv["vector"].kind == "list" and kv["vector"].text == "showing 24 of 1,000; min 0, mean 499.5, max 999"
    assert kv["text"].text.endswith("… (5,000 characters)") and len(kv["text"].text) < 500
    assert kv["nested"].kind == "kv"
    matrix = generic_view([[1.0] * 40] * 3)
    assert matrix.kind == "table" and matrix.text == "matrix 3 × 40 (corner shown)"


def test_json_results_roundtrip_and_schema_checks(tmp_path: Path) -> None:
    records = _records()
    records[0].metrics["nan_metric"] = float("nan")
    path = write_results_json(tmp_path / "r.json", records, _run())
    document = load_results(path)
    assert document["schema_version"] == 1 and document["verdict"] == "FAIL"
    assert document["audits"][0]["metrics"]["nan_metric"] == "nan"
    for bad, message in [({"schema": "other"}, "not an lmaudit results file"),
                         ({"schema": "lmaudit-results", "schema_version": 99, "audits": []}, "newer"),
                         ({"schema": "lmaudit-results", "schema_version": 1, "audits": [{}]}, "nodeid")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ResultsFileError, match=message):
            load_results(tmp_path / "bad.json")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_text_atomic(tmp_path / "report.html", "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lmaudit.reports.atomic.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]
