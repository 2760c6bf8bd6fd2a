"""``lmaudit heads``: the arithmetic head sweep through the registered ``arithmetic_head_sweep`` check (Yu &
Ananiadou 2024): every head of the swept layers ablated in turn on screening prompts, the candidates (largest
drop ≥ the threshold) re-tested on fresh prompts with an exact sign test, Bonferroni over candidates × operations.

    drop(L, h, op) = accuracy_clean(op) − accuracy_{−(L,h)}(op)

Quick look (default): :data:`QUICK`, a fifth of the depth. ``--thorough``: the check's own defaults, what the
audit entry runs (every layer).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lmaudit.checks.cli.output import finish, fmt, print_header, table
from lmaudit.checks.cli.session import Action, Session, UsageError, plan_checks
from lmaudit.checks.core.stats import layer_range

if TYPE_CHECKING:
    from lmaudit.checks.arithmetic.head_sweep import HeadSweepAudit
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.cli.session import Outcome

# The sweep costs about Σ_L (n_layers − L) re-run layers per head (each ablation re-runs the prompts from its
# layer on), several minutes on a 30-layer model on 2 CPU cores. The quick look sweeps every head of the middle
# fifth of the depth on half the audit's screening prompts (still several correct answers: the premise), and
# confirms its 3 largest candidates on fresh prompts. It answers "which heads of these layers matter", not the
# audit's claim about all heads: --thorough runs the audit's own sweep, every layer.
QUICK: dict[str, Any] = {"layer_fraction": (0.4, 0.6), "n_per_op": 4, "confirm_per_op": 8, "max_candidates": 3}


def prepare_heads(args: argparse.Namespace) -> Action:
    """Ablate every attention head; confirm the heads whose ablation drops accuracy on fresh prompts."""
    flags = {"ops": args.ops, "digits": args.digits, "templates": args.templates, "n_per_op": args.n_per_op,
             "confirm_per_op": args.confirm_per_op, "few_shot": args.few_shot, "threshold_points": args.threshold,
             "layer_fraction": tuple(args.layers) if args.layers else None,
             "max_candidates": args.max_candidates}
    (planned,) = plan_checks(args, ["arithmetic_head_sweep"], quick={"arithmetic_head_sweep": QUICK}, flags=flags)
    try:  # the layer fractions must name at least one layer of any depth
        layer_range(1, *planned.params.layer_fraction)
    except ValueError as exc:
        raise UsageError(f"--layers {' '.join(map(str, planned.params.layer_fraction))}: {exc}") from None

    def run(session: Session) -> int:
        def render(outcomes: list[Outcome]) -> None:
            print_header(session, "arithmetic head sweep")
            print_sweep(outcomes[0].result, top=args.top)

        return finish("heads", session, session.run_each([planned]), as_json=args.json, render=render)

    return run


def print_sweep(result: HeadSweepAudit, *, top: int) -> None:
    screen = result.screen
    print(f"screen: {sum(screen.n_per_op)} prompts, {screen.n_heads} heads of layers {screen.layers[0]}-"
          f"{screen.layers[-1]} ({screen.method}, {screen.seconds:.1f} s); clean accuracy "
          + ", ".join(f"{op}: {100 * b:.1f} %" for op, b in zip(screen.ops, screen.baseline, strict=True)))
    rows = [(f"L{layer}.H{head}", fmt(100 * drop, "{:.1f}"), "exact" if screen.exact[layer][head] else "upper bound")
            for layer, head, drop in screen.top_heads(top)]
    print(f"largest screen drops (points; candidates: ≥ {screen.threshold_points:g}):")
    print(table(("head", "max drop", "measure"), rows, indent="  "))
    if not result.confirmed:
        print("no candidate to confirm")
    else:
        print(f"confirmation on {result.n_confirm_prompts} fresh prompts (one-sided sign test, family-wise "
              f"alpha {result.alpha:g}, Bonferroni over {len(result.confirmed)} candidates x {len(screen.ops)} ops):")
        rows = [(c.name, fmt(c.screen_drop_points, "{:.1f}"), c.op, fmt(c.drop_points, "{:.1f}"), c.breaks, c.fixes,
                 fmt(c.p_value, "{:.2g}"), "yes" if c.significant else "no") for c in result.confirmed]
        print(table(("head", "screen drop", "op", "drop", "broken", "fixed", "p", "significant"), rows, indent="  "))
    print(f"significant heads: {', '.join(result.significant_heads) or 'none'} ({result.n_significant} of "
          f"{result.n_heads} = {100 * result.significant_fraction:.1f} %); {result.seconds:.1f} s")


def register(commands: Commands) -> None:
    parser = commands.model("heads", prepare_heads)
    parser.add_argument("--ops", default=None, help="operations, e.g. '+-*/' (default all four)")
    parser.add_argument("--digits", type=int, nargs="+", default=None, help="operand digit counts (default 1)")
    parser.add_argument("--templates", nargs="+", default=None, help="symbolic, words, phrase, qa (default symbolic)")
    parser.add_argument("--n-per-op", type=int, default=None,
                        help="screening prompts per operation, digit count and template")
    parser.add_argument("--confirm-per-op", type=int, default=None, help="fresh confirmation prompts, likewise")
    parser.add_argument("--few-shot", type=int, default=None, help="solved examples before each prompt (default 4)")
    parser.add_argument("--threshold", type=float, default=None, help="candidate: a drop of this many points (10)")
    parser.add_argument("--layers", type=float, nargs=2, default=None, metavar=("FROM", "TO"),
                        help="swept layers as fractions of the depth (quick 0.4 0.6; thorough 0 1: every layer)")
    parser.add_argument("--max-candidates", type=int, default=None, help="candidates confirmed at most (10)")
    parser.add_argument("--top", type=int, default=10, help="screen rows printed")
    parser.add_argument("--thorough", action="store_true",
                        help="the check's own defaults (what the audit entry runs) instead of the quick look")
