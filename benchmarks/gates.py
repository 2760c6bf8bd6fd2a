"""Every gate of the audit suite beside the counter-example tests that make it fail, as a markdown table.

One row per gate (an audit entry's threshold on one metric, ``audits/*.yaml`` in every profile, and the Python
audits' ``audit_expect`` thresholds): its area, entry, metric and threshold (full / quick), the claim in short,
the counter-example tests named ``@pytest.mark.counterexample("entry.metric")`` and the first sentence of each
one's docstring. The same static scan as ``tests/test_gates.py`` (:mod:`tests.gate_scan`): no model is loaded
and no test runs. Prints the table and writes it to ``benchmarks/out/gates.md``; exits 1 when a gate has no
counter-example or a marker names no gate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not installed; the scan lives there, beside the test that asserts it

from tests.gate_scan import Coverage, coverage, first_sentence  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
AREA_ORDER = ("model", "superweights", "quantization", "arithmetic", "bias", "other")  # the report's sections
CLAIM_CHARS = 110  # the claim column is a reminder; the audit file has the whole claim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="accepted for benchmarks/run_all.py; no effect")
    parser.parse_args()
    suite = coverage()
    text = render(suite)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gates.md").write_text(text, encoding="utf-8")
    return 1 if suite.uncovered or suite.stale or suite.unnamed else 0


def render(suite: Coverage) -> str:
    lines = [
        "## Gates and their counter-examples (`benchmarks/gates.py`)",
        "",
        f"{len(suite.gates)} gates, {len(suite.counterexamples)} counter-example tests "
        "(`pytest -m counterexample tests/`); `tests/test_gates.py` checks that every gate has one. "
        "Thresholds: `full / quick` when the profiles differ, `(full only)` when the quick profile skips the entry.",
        "",
        "| area | audit entry | metric and threshold (full / quick) | claim (short) | counter-example test(s) | "
        "what it does |",
        "|---|---|---|---|---|---|",
    ]
    order = {area: i for i, area in enumerate(AREA_ORDER)}
    for gate in sorted(suite.gates, key=lambda g: order.get(g.area, len(order))):  # stable: file order inside
        tests = suite.tests_of(gate)
        cells = [
            gate.area,
            f"`{gate.entry}`",
            f"`{gate.metric}` {threshold_text(gate.thresholds)}",
            shorten(gate.claim),
            "<br>".join(f"`{t.node_id}`" for t in tests) or "**none**",
            "<br>".join(first_sentence(t.doc) or "(no docstring)" for t in tests) or "–",
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    problems = [f"- no counter-example: `{g.name}`" for g in suite.uncovered]
    problems += [f"- `{t.node_id}` names `{name}`, which is no gate" for t, name in suite.stale]
    problems += [f"- `{t.node_id}` names no gate" for t in suite.unnamed]
    if problems:
        lines += ["", "**Problems:**", "", *problems]
    return "\n".join(lines) + "\n"


def threshold_text(thresholds: dict[str, str]) -> str:
    """``≥ 0.1`` when every profile agrees, ``≥ 1 (full only)``, or ``≥ a / ≥ b`` (full / quick)."""
    if set(thresholds) == {"*"}:
        return f"{thresholds['*']} (every profile)"
    full, quick = thresholds.get("full"), thresholds.get("quick")
    if full == quick:
        return str(full)
    if quick is None:
        return f"{full} (full only)"
    if full is None:
        return f"{quick} (quick only)"
    return f"{full} / {quick}"


def shorten(claim: str) -> str:
    """The claim up to its first ``;`` and at most :data:`CLAIM_CHARS` characters, cut at a word."""
    claim = " ".join(claim.split()).split("; ")[0]
    if len(claim) <= CLAIM_CHARS:
        return claim
    return claim[:CLAIM_CHARS].rsplit(" ", 1)[0].rstrip(",:;") + " …"


if __name__ == "__main__":
    raise SystemExit(main())
