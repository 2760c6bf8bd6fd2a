"""Draw lmaudit's import graph by layer: ``docs/imports.svg``.

    .venv/bin/python benchmarks/import_graph.py

Every module of ``lmaudit.checks`` and ``lmaudit.reports`` (``tests/test_architecture.import_graph``: grimp, type-checking imports
excluded) is folded into its unit: the core, the harness, each area, the catalog, the
plugin, the CLI and the reports. An arrow A → B, labelled with the number of module-level imports behind it, means
"A imports B". The units are drawn in their layers (``pyproject.toml``'s import-linter contracts), highest first,
so an arrow that points up would be a dependency against the architecture; the test asserts there is none, and
no import cycle between modules either.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not installed; the graph is the one the architecture test checks

from tests.test_architecture import import_graph  # noqa: E402

AREAS = ("superweights", "quantization", "arithmetic", "bias", "model")
LAYERS = (("cli",), ("plugin",), ("catalog",), AREAS, ("harness",), ("core",), ("reports",))
X = {"cli": 0.2, "plugin": 0.8, "catalog": 0.5, "harness": 0.25, "core": 0.6, "reports": 0.9}  # arrows stay apart


def unit(module: str) -> str:
    """``lmaudit.checks.bias.editing`` → ``bias``; ``lmaudit.reports.html`` → ``reports``."""
    parts = module.split(".")
    if parts[1] == "reports":
        return "reports"
    return parts[2].removesuffix(".py") if len(parts) > 2 else "checks"


def unit_edges() -> collections.Counter[tuple[str, str]]:
    edges: collections.Counter[tuple[str, str]] = collections.Counter()
    for module, imports in import_graph().items():
        for imported in imports:
            a, b = unit(module), unit(imported)
            if a != b and "checks" not in (a, b):
                edges[a, b] += 1
    return edges


def draw(edges: collections.Counter[tuple[str, str]], path: Path) -> None:
    position = {}
    for depth, layer in enumerate(LAYERS):
        for i, name in enumerate(layer):
            position[name] = (X.get(name, (i + 0.5) / len(layer)), 1 - depth / (len(LAYERS) - 1))
    fig, ax = plt.subplots(figsize=(9, 7))
    for (a, b), n in sorted(edges.items()):
        (x0, y0), (x1, y1) = position[a], position[b]
        ax.annotate("", xy=(x1, y1 + 0.035), xytext=(x0, y0 - 0.035),
                    arrowprops={"arrowstyle": "->", "color": "#c0392b" if y1 > y0 else "#7f8c8d", "lw": 0.8,
                                "shrinkA": 0, "shrinkB": 0, "connectionstyle": "arc3,rad=0.12"})
        ax.text(0.55 * x0 + 0.45 * x1, 0.55 * y0 + 0.45 * y1, str(n), fontsize=7, color="#34495e", ha="center", va="center",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none"})
    for name, (x, y) in position.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=10,
                bbox={"boxstyle": "round,pad=0.35", "fc": "#eaf2f8", "ec": "#2e86c1"})
    upward = sum(1 for a, b in edges if position[b][1] > position[a][1])
    ax.set_title(f"lmaudit imports by unit (arrows: A imports B; label: module imports); "
                 f"{upward} point up", fontsize=10)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    fig.savefig(path, format=path.suffix.lstrip("."), bbox_inches="tight",
                metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)


def main() -> int:
    edges = unit_edges()
    out = ROOT / "docs" / "imports.svg"
    draw(edges, out)
    for (a, b), n in sorted(edges.items()):
        print(f"{a:>12} -> {b:<12} {n}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
