"""Run the benchmarks, each in its own process, and merge their sections into ``benchmarks/RESULTS.md``.

Each ``benchmarks/bench_*.py`` (and ``benchmarks/gates.py``, the gate → counter-example table) writes its markdown
section, headed ``## ...``, to ``benchmarks/out/<name>.md``. A section replaces the section of RESULTS.md with
the same heading, or is appended; sections no benchmark wrote (whole-run wall times, the faults tried, measured
by hand with the commands they quote) are kept as they are, so re-running one benchmark never loses another's
figures. ``--only NAME`` runs one; ``--quick`` passes ``--quick`` on; ``--assemble-only`` merges what
``benchmarks/out`` already holds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "RESULTS.md"
HEADING = re.compile(r"^## ", re.MULTILINE)
SCRIPT = re.compile(r"\b(bench_\w+|gates)\.py\b")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--assemble-only", action="store_true", help="only merge benchmarks/out into RESULTS.md")
    args = parser.parse_args()
    scripts = [*sorted(HERE.glob("bench_*.py")), HERE / "gates.py"]
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    failed = []
    if not args.assemble_only:
        for script in scripts:
            print(f"== {script.name}", flush=True)
            cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
            if subprocess.run(cmd, cwd=HERE.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                failed.append(script.name)
    fresh = [p.read_text(encoding="utf-8") for p in sorted(OUT.glob("*.md"))]
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else ""
    RESULTS.write_text(merge(old, fresh, header()), encoding="utf-8")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def header() -> str:
    return (f"# Benchmark results\n\nLast assembled by `make bench` (`benchmarks/run_all.py`) on {datetime.date.today()}:"
            f" {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only. Every"
            " speed figure is a ratio against the naive method measured in the same run; each section names its"
            " script or command and the date it was measured.\n\n")


def split_sections(text: str) -> list[str]:
    """The ``## `` sections of a markdown text (what precedes the first one is dropped: it is the header)."""
    starts = [m.start() for m in HEADING.finditer(text)]
    return [text[a:b].rstrip() + "\n" for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def section_key(section: str) -> str:
    """What identifies a section: the first script its heading names (``bench_precision.py``), so a heading
    reworded by hand is still replaced by that script's fresh output; else the heading line itself."""
    heading = section.splitlines()[0]
    script = SCRIPT.search(heading)
    return script.group(0) if script else heading


def merge(old: str, fresh: list[str], header: str) -> str:
    """``old``'s sections in their order, each replaced by the fresh section with the same key
    (:func:`section_key`); fresh sections with a new key are appended."""
    new = {section_key(s): s for text in fresh for s in split_sections(text)}
    sections = [new.pop(section_key(s), s) for s in split_sections(old)]
    return header + "\n".join([*sections, *new.values()])


if __name__ == "__main__":
    raise SystemExit(main())
