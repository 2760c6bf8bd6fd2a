"""``lmaudit bias --model M [--edit K] [--benchmarks] [--json]``: occupation gender bias, optionally the
neuron edit with its random control and the published benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lmaudit.checks.core.errors import LmAuditError


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("bias", cmd_bias)
    p.add_argument("--edit", type=int, default=None, metavar="K",
                   help="zero the K CNA neurons behind the bias (and K random ones); report side effects")
    p.add_argument("--templates", choices=("all", "quick"), default="all", help="template set (all: 8)")
    p.add_argument("--quick", action="store_true", help="the quick profile's edit settings (fewer prompts)")
    p.add_argument("--corpus", default="pydoc", help="--edit's corpus: pydoc, wikitext2, a path")
    p.add_argument("--benchmarks", action="store_true", help="run Winogender, WinoBias, CrowS-Pairs")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark task (default all)")


def cmd_bias(args: argparse.Namespace) -> int:
    """Occupation gender bias (woman, man, total bias; correlation with the share of women)."""
    from lmaudit.checks.bias.checks import BiasEditingParams
    from lmaudit.checks.bias.occupations import QUICK_TEMPLATES, TEMPLATES, occupation_table
    from lmaudit.checks.bias.scores import occupation_bias
    from lmaudit.checks.core.loading import load_model

    if args.edit is not None and args.edit < 1:
        raise LmAuditError(f"--edit needs K >= 1, got {args.edit}")
    loaded = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    templates = TEMPLATES if args.templates == "all" else QUICK_TEMPLATES
    occupations = occupation_table()
    scores = occupation_bias(loaded.model, loaded.tokenizer, templates=templates, occupations=occupations)
    out: dict[str, Any] = {"model": loaded.spec, "bias": scores}
    if args.edit is not None:
        from lmaudit.checks.bias.editing import edit_bias
        from lmaudit.checks.core.corpora import load_corpus

        p = BiasEditingParams(k=args.edit)
        out["edit"] = edit_bias(
            loaded.model, loaded.tokenizer, loaded.adapter, load_corpus(args.corpus), k=args.edit,
            templates=templates, rank_templates=p.rank_templates,
            n_per_side=p.quick_n_per_side if args.quick else p.n_per_side,
            n_layers=p.quick_n_layers if args.quick else p.n_layers, seq_len=p.seq_len,
            n_windows=p.quick_n_windows if args.quick else p.n_windows, n_arithmetic=p.n_arithmetic,
            baseline_scores=scores, occupations=occupations)
    if args.benchmarks:
        from lmaudit.checks.bias.benchmarks import run_bias_benchmarks

        out["benchmarks"] = run_bias_benchmarks(loaded.model, loaded.tokenizer, limit=args.limit)
    if args.json:
        from lmaudit.reports.records import to_jsonable

        json.dump(to_jsonable(out), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_scores(scores)
    if "edit" in out:
        _print_edit(out["edit"])
    if "benchmarks" in out:
        print("\nbenchmarks (lm-eval, local data):")
        for key, value in out["benchmarks"].metrics().items():
            print(f"  {key:<36} {value:.4f}" if isinstance(value, float) else f"  {key:<36} {value}")
    return 0


def _print_scores(scores: Any) -> None:
    print(f"{'occupation':<14} {'women %':>8} {'r':>8}")
    for row in sorted(scores.occupations, key=lambda r: r.r):
        print(f"{row.occupation:<14} {100 * row.share_women:>8.1f} {row.r:>+8.3f}")
    m = scores.metrics()
    print(f"\ntotal bias {m['total_bias']:.4f}  woman bias {m['woman_bias']:.4f}  "
          f"man bias {m['man_bias']:.4f}  correlation(r, share of women) {m['correlation']:.3f}  "
          f"({m['n_occupations']} occupations, "
          f"{m['n_templates']} templates)")


def _print_edit(result: Any) -> None:
    b = result.baseline
    print(f"\nedit: k={result.k} neurons in layers {list(result.ranking.layers)}")
    print(f"{'':<10} {'total bias':>10} {'reduction':>10} {'ppl':>9} {'ppl Δ%':>8} {'arith':>6} {'Δ':>6} "
          f"{'SW intact':>9} {'SW found':>8}")
    print(f"{'unedited':<10} {b.total_bias:>10.4f} {'':>10} {b.perplexity:>9.3f} {'':>8} "
          f"{b.arithmetic_accuracy:>6.3f}")
    for e in (result.edit, result.control):
        m = e.measured
        print(f"{e.kind:<10} {m.total_bias:>10.4f} {e.bias_reduction_pct:>9.1f}% {m.perplexity:>9.3f} "
              f"{e.perplexity_change_pct:>+8.2f} {m.arithmetic_accuracy:>6.3f} {e.arithmetic_change:>+6.3f} "
              f"{e.superweights_intact!s:>9} {e.superweights_found!s:>8}")
    top = ", ".join(f"L{layer}.{n}" for layer, n in result.ranking.neurons[:10])
    print(f"top neurons (layer.index): {top}")
