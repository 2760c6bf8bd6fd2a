"""Run every ``benchmarks/bench_*.py`` in its own process and assemble ``benchmarks/RESULTS.md``.

Each benchmark writes its markdown section to ``benchmarks/out/<name>.md``; this script concatenates them under
a header that records the machine and the date. ``--only NAME`` runs one; ``--quick`` passes ``--quick`` on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--assemble-only", action="store_true", help="only rebuild RESULTS.md from benchmarks/out")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    failed = []
    if not args.assemble_only:
        for script in scripts:
            print(f"== {script.name}", flush=True)
            cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
            if subprocess.run(cmd, cwd=HERE.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                failed.append(script.name)
    sections = [p.read_text() for p in sorted(OUT.glob("*.md"))]
    header = [
        "# Benchmark results",
        "",
        f"Assembled by `make bench` (`benchmarks/run_all.py`) on {datetime.date.today()}: "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, CPU only. "
        "Every figure is a ratio against the naive method measured in the same run.",
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(header) + "\n" + "\n".join(sections))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
