"""The report of a real (pytester) audit run, opened in headless Chromium: it renders with no console error,
makes no network request, shows the summary table, and its screenshot is a real picture.

Skips only when no chromium binary is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest

from tests.browser import find_chromium, open_page, png_size
from tests.test_plugin import FAKE_CONFTEST, write_audit
from tests.test_plugin import isolated_result_cache as isolated_result_cache  # noqa: F401  (autouse)
from tests.test_plugin import tiny_dir as tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed")

XSS = "<script>alert(1)</script>"
VISIBLE = """(() => {
  const table = document.getElementById('summary');
  if (!table) return null;
  const box = table.getBoundingClientRect(), style = getComputedStyle(table);
  return {width: box.width, height: box.height, top: box.top, display: style.display,
          visibility: style.visibility, rows: table.tBodies[0].rows.length, viewport: window.innerHeight,
          scripts: document.scripts.length, svgs: document.querySelectorAll('svg').length,
          verdict: document.getElementById('verdict').textContent};
})()"""


def _distinct_row_bytes(png: bytes) -> int:
    """How many different scanlines the PNG has (a blank page has one or two)."""
    data, offset = b"", 8
    while offset < len(png):
        length = int.from_bytes(png[offset:offset + 4], "big")
        kind = png[offset + 4:offset + 8]
        if kind == b"IDAT":
            data += png[offset + 8:offset + 8 + length]
        offset += 12 + length
    width, height = png_size(png)
    raw = zlib.decompress(data)
    stride = len(raw) // height
    return len({raw[i * stride + 1:(i + 1) * stride] for i in range(height)})


def test_report_of_a_real_run_renders_cleanly_in_chromium(
    pytester: pytest.Pytester, tiny_dir: Path, tmp_path: Path  # noqa: F811
) -> None:
    pytester.makeconftest(FAKE_CONFTEST)
    (pytester.path / "audits").mkdir()
    write_audit(pytester, f"""
audits:
  - name: passes
    check: fake_value
    params: {{value: 0.5, token: "{XSS}"}}
    expect: {{value: {{max: 1}}}}
  - name: misses
    check: fake_value
    params: {{value: 3}}
    expect: {{value: {{max: 1}}}}
  - name: crashes
    check: fake_value
    params: {{crash: true}}
  - name: quick_only
    check: fake_value
    profiles: [quick]
""")
    result = pytester.runpytest_inprocess("audits/", "--model", str(tiny_dir), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2, skipped=1)
    report = pytester.path / "audit-report.html"

    visit = open_page(report.as_uri(), expression=VISIBLE)

    assert visit.console_errors == [] and visit.exceptions == []
    network = [url for url in visit.requests if url != report.as_uri() and not url.startswith("data:")]
    assert network == [], f"the report requested {network}"
    seen = visit.evaluated
    assert seen is not None, "no #summary table"
    assert seen["display"] != "none" and seen["visibility"] == "visible"
    assert seen["width"] > 600 and seen["height"] > 100 and 0 <= seen["top"] < seen["viewport"]
    assert seen["rows"] == 4 and seen["scripts"] == 0 and seen["svgs"] >= 2 and seen["verdict"] == "FAIL"

    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(visit.screenshot)
    assert png_size(visit.screenshot) == (1280, 1400)
    assert len(visit.screenshot) > 20_000 and _distinct_row_bytes(visit.screenshot) > 100
