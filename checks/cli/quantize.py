"""``lmaudit quantize``: naive vs super-outlier-aware round-to-nearest quantization through the registered
``quantization_recovery`` check (Yu et al. 2024, §4), one scheme or both W8A8 granularities.

    lmaudit quantize [--scheme w8a8-per-tensor|w8a8-per-token|w8a8|w4-block] [--block B] [--bits N]
                     [--n-windows K] [--seq-len T] [--corpora C ...] [--corpus C] [--thorough] [--json]

The super outliers come from the super-weight area's detection (the catalog is loaded, so
``SuperWeightSites`` has its provider); a model with none, or on which naive RTN does no damage, has nothing to
recover: the premise is missing and the command says why. Clipping z of the weight-only scheme is calibrated on
the session corpus (``--corpus``, default pydoc), as in the audits.

Quick look (default): the audit's quick-profile settings, 2 windows of pydoc, and the per-tensor W8A8 scheme
(Table 3's headline row), which needs three perplexity runs; ``w4-block`` also searches the clipping z, one
quantization of every weight per candidate, about three times the cost. ``--thorough``: the check's own defaults
(the full profile), 4 windows on pydoc and wikitext2 when ``../shared/data`` has it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lmaudit.checks.cli.output import finish, fmt, print_header, table
from lmaudit.checks.cli.session import Action, Session, UsageError, check_corpus, plan_checks

if TYPE_CHECKING:
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.cli.session import Outcome

SCHEMES = {"w4-block": ("w4-block",), "w8a8": ("w8a8-per-token", "w8a8-per-tensor"),
           "w8a8-per-token": ("w8a8-per-token",), "w8a8-per-tensor": ("w8a8-per-tensor",)}
QUICK: dict[str, Any] = {"n_windows": 2, "corpora": ["pydoc"]}  # audits/quantization.yaml, profile quick


def prepare_quantize(args: argparse.Namespace) -> Action:
    """Naive vs super-outlier-aware RTN: perplexity and the share of the loss recovered, per corpus."""
    from lmaudit.checks.core.corpora import CORPUS_NAMES

    if (args.block is not None or args.bits is not None) and args.scheme != "w4-block":
        raise UsageError(f"--block and --bits set the w4-block scheme, not {args.scheme}: add --scheme w4-block")
    for corpus in args.corpora or ():
        if corpus not in CORPUS_NAMES:
            check_corpus(corpus)
    flags = {"bits": args.bits, "block_size": args.block, "n_windows": args.n_windows, "seq_len": args.seq_len,
             "corpora": args.corpora}
    plans = [plan_checks(args, ["quantization_recovery"], quick={"quantization_recovery": QUICK},
                         flags={**flags, "scheme": scheme})[0]
             for scheme in SCHEMES[args.scheme]]
    for planned in plans:
        validate(planned.params)

    def run(session: Session) -> int:
        def render(outcomes: list[Outcome]) -> None:
            print_header(session, "naive vs super-outlier-aware round-to-nearest")
            print_recovery(outcomes)

        return finish("quantize", session, session.run_each(plans), as_json=args.json, render=render)

    return run


def validate(params: Any) -> None:
    """What the parameter model leaves to the science, checked before the model loads: the scheme's quantization
    spec (bits, block size) and window sizes the perplexity definition can use."""
    from lmaudit.checks.quantization.checks import build_scheme

    scheme = build_scheme(params.scheme, bits=params.bits, block_size=params.block_size)
    _ = scheme.weight_spec  # raises QuantizationError naming the field
    if params.n_windows < 1 or params.seq_len < 2:
        raise UsageError(f"n_windows must be >= 1 and seq_len >= 2, got {params.n_windows} and {params.seq_len}")


def print_recovery(outcomes: list[Outcome]) -> None:
    first = outcomes[0].result
    sws = ", ".join(f"L{layer}[{row}, {col}]" for layer, row, col in first.evaluation.super_weights)
    print(f"super weights held out: {sws}; {first.evaluation.n_windows} windows × {first.evaluation.seq_len} "
          f"tokens per corpus")
    rows = []
    for outcome in outcomes:
        e = outcome.result.evaluation
        for r in e.rows:
            rows.append((r.scheme, r.corpus, r.ppl_fp, r.ppl_naive, r.ppl_aware, r.ppl_hold_out,
                         fmt(100 * r.recovery, "{:.1f}%"), fmt(100 * r.hold_out_recovery, "{:.1f}%"),
                         fmt(e.clip.z, "{:g}") if e.clip else "-"))
    print(table(("scheme", "corpus", "FP PPL", "naive PPL", "aware PPL", "hold-out PPL", "recovery",
                 "hold-out rec.", "clip z"), rows, indent="  "))
    for outcome in outcomes:
        result = outcome.result
        missing = f"; not on this machine: {', '.join(result.missing_corpora)}" if result.missing_corpora else ""
        grid = " (weights already on a 4-bit grid: W4 figures re-quantize a quantized model)" \
            if result.weights_on_grid else ""
        print(f"{outcome.params['scheme']}: recovery {fmt(100 * result.recovery, '{:.1f}%')} (worst damaged corpus), "
              f"hold-out {fmt(100 * result.hold_out_recovery, '{:.1f}%')}, aware/FP PPL "
              f"{fmt(result.ppl_ratio, '{:.3f}')}{missing}{grid}")
    print(first.definition)


def register(commands: Commands) -> None:
    parser = commands.model("quantize", prepare_quantize, corpus=True)
    parser.add_argument("--scheme", choices=tuple(SCHEMES), default="w8a8-per-tensor",
                        help="w8a8-per-tensor (default), w8a8-per-token, w8a8 (both), w4-block (with its z search)")
    parser.add_argument("--block", type=int, default=None, help="block size B of w4-block, in weights (default 128²)")
    parser.add_argument("--bits", type=int, default=None, help="weight bits of w4-block (default 4)")
    parser.add_argument("--n-windows", type=int, default=None, help="evaluation windows per corpus")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256)")
    parser.add_argument("--corpora", nargs="+", default=None, metavar="CORPUS",
                        help="evaluated corpora: names or text files (quick: pydoc; thorough: pydoc, wikitext2)")
    parser.add_argument("--thorough", action="store_true",
                        help="the check's own defaults (the full profile) instead of the quick look")
