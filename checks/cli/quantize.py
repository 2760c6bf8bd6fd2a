"""``lmaudit quantize``: the naive vs super-outlier-aware perplexity table of one quantization scheme.

    lmaudit quantize --model M --scheme w8a8|w4-block [--block B] [--bits N] [--n-windows K] [--corpus C] [--json]

``w8a8`` prints its per-token and per-tensor activation rows; ``w4-block`` the weight-only RTN row at block
size B (default 128² = 16384). Corpora: ``pydoc`` always, ``wikitext2`` when ``../shared/data`` has it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from lmaudit.checks.core.errors import LmAuditError

SCHEMES = ("w8a8", "w4-block")


def _fmt(value: float, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Naive vs super-outlier-aware round-to-nearest: perplexity and recovery per corpus."""
    from lmaudit.checks.core.loading import load_model
    from lmaudit.checks.harness.context import AuditContext
    from lmaudit.checks.quantization.checks import (
        QuantEvalParams,
        build_scheme,
        evaluate_scheme,
        super_outliers,
    )

    if args.block < 1 or args.n_windows < 1 or args.seq_len < 2:
        raise LmAuditError("--block and --n-windows must be >= 1 and --seq-len >= 2")
    names = ("w8a8-per-token", "w8a8-per-tensor") if args.scheme == "w8a8" else ("w4-block",)
    loaded = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    corpora = tuple(args.corpus or ("pydoc", "wikitext2"))
    context = AuditContext(model=loaded, corpus_spec=corpora[0])  # the z search calibrates on the first corpus
    params = QuantEvalParams(seq_len=args.seq_len, n_windows=args.n_windows, corpora=corpora)
    evaluations = [evaluate_scheme(context, params, build_scheme(n, bits=args.bits, block_size=args.block))
                   for n in names]
    outliers = super_outliers(context)
    if args.json:
        from lmaudit.checks.cli.output import print_json

        print_json({"model": loaded.spec, "super_weights": outliers.weights, "schemes": evaluations})
        return 0
    sws = ", ".join(f"L{layer}[{row}, {col}]" for layer, row, col in outliers.weights) or "none found"
    print(f"model {loaded.spec}; super weights held out: {sws}; {args.n_windows} windows × {args.seq_len} tokens")
    header = ("scheme", "corpus", "FP PPL", "naive PPL", "aware PPL", "recovery", "clip z", "peak mem")
    rows = []
    for e in evaluations:
        for r in e.rows:
            rows.append((r.scheme, r.corpus, _fmt(r.ppl_fp), _fmt(r.ppl_naive), _fmt(r.ppl_aware),
                         _fmt(r.recovery_pct, "{:.1f}%"), _fmt(e.clip.z, "{:g}") if e.clip else "-",
                         f"{max(e.naive_memory.peak_ratio, e.aware_memory.peak_ratio):.2f}× model"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("quantize", cmd_quantize)
    p.add_argument("--scheme", choices=SCHEMES, required=True, help="w8a8 (per-token and per-tensor) or w4-block")
    p.add_argument("--block", type=int, default=128**2, help="block size B of w4-block (elements; default 16384)")
    p.add_argument("--bits", type=int, default=4, help="weight bits of w4-block (default 4)")
    p.add_argument("--n-windows", type=int, default=4, help="evaluation windows per corpus (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--corpus", action="append", default=[],
                   help="corpus name or text file, repeatable (default: pydoc, and wikitext2 when available)")
