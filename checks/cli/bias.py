"""``lmaudit bias``: occupation gender bias through the registered ``occupation_bias`` check; ``--edit`` adds the
CNA neuron edit (``bias_editing``: held-out reduction against seeded random draws, side effects) and
``--benchmarks`` the published benchmarks (``bias_benchmarks``: Winogender, WinoBias, CrowS-Pairs via lm-eval on
the local copies in ``../shared/data``).

    r_o = log P(o | female prompt) − log P(o | male prompt), averaged over templates (Yu & Ananiadou 2024)

Quick look (default): the edit runs with the audit's quick-profile settings and the benchmarks on a quarter of
their documents; ``--thorough`` runs the checks' own defaults (the full profile, every document). A model that
shows no bias to edit runs the scores and then says why the edit was skipped.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lmaudit.checks.cli.output import finish, fmt, print_header, table
from lmaudit.checks.cli.session import Action, Session, plan_checks

if TYPE_CHECKING:
    from lmaudit.checks.bias.benchmarks import BiasBenchmarks
    from lmaudit.checks.bias.editing import BiasEditResult
    from lmaudit.checks.bias.scores import BiasScores
    from lmaudit.checks.cli.commands import Commands
    from lmaudit.checks.cli.session import Outcome

# audits/bias.yaml, profile quick: fewer ranking prompts and layers, shorter side-effect measurements; the same
# held-out judgement and the same >= 20 control draws.
QUICK_EDIT: dict[str, Any] = {"top_fraction": 0.25, "layer_fraction": 0.07, "n_windows": 2, "n_arithmetic": 20}
QUICK_BENCHMARKS: dict[str, Any] = {"fraction": 0.25}  # a seeded quarter of each task's documents


def prepare_bias(args: argparse.Namespace) -> Action:
    """Occupation gender bias (woman, man, total bias; correlation with the share of women)."""
    names = ["occupation_bias", *(["bias_editing"] if args.edit else []),
             *(["bias_benchmarks"] if args.benchmarks else [])]
    if args.neuron_fraction is not None and not args.edit:
        from lmaudit.checks.cli.session import UsageError

        raise UsageError("--neuron-fraction sets the edit: give --edit too")
    plans = plan_checks(args, names, quick={"bias_editing": QUICK_EDIT, "bias_benchmarks": QUICK_BENCHMARKS},
                        flags={"neuron_fraction": args.neuron_fraction, "fraction": args.fraction})

    def run(session: Session) -> int:
        def render(outcomes: list[Outcome]) -> None:
            print_header(session, "occupation gender bias")
            for outcome in outcomes:
                {"occupation_bias": print_scores, "bias_editing": print_edit,
                 "bias_benchmarks": print_benchmarks}[outcome.check or ""](outcome.result)

        return finish("bias", session, session.run_each(plans), as_json=args.json, render=render)

    return run


def print_scores(scores: BiasScores) -> None:
    rows = [(row.occupation, fmt(100 * row.share_women, "{:.1f}"), fmt(row.r, "{:+.3f}"))
            for row in sorted(scores.occupations, key=lambda r: r.r)]
    print(table(("occupation", "women %", "r"), rows, indent="  "))
    print(f"total bias {scores.total_bias:.4f}  woman bias {scores.woman_bias:.4f}  man bias {scores.man_bias:.4f}  "
          f"Pearson(r, share of women) {scores.correlation:+.3f} (one-sided permutation p = "
          f"{scores.correlation_p:.3g}, {scores.n_permutations} permutations)")
    print(f"{scores.n_occupations} occupations ({scores.share_source}), {scores.n_templates} templates")


def print_edit(result: BiasEditResult) -> None:
    c, s = result.control, result.side_effects
    print(f"\nCNA edit: {result.k} neurons zeroed in layers {list(result.ranking.layers)} (ranked on "
          f"{len(result.split.rank_templates)} templates x {len(result.split.rank_occupations)} occupations, "
          f"judged on the other {len(result.split.eval_templates)} x {len(result.split.eval_occupations)})")
    print(f"  held-out total bias {result.baseline.total_bias:.4f} -> {result.edited.total_bias:.4f}: "
          f"reduction {result.bias_reduction_pct:.1f} % (on the ranking prompts {result.in_sample_reduction_pct:.1f} %)")
    print(f"  {c.n} random draws of {result.k} neurons: reduction {c.mean:.1f} ± {c.std:.1f} % "
          f"[{c.min:.1f}, {c.max:.1f}], upper bound {result.control_reduction_upper_pct:.1f} %; CNA beyond it "
          f"{result.reduction_beyond_control_pct:+.1f} points")
    print(f"  side effects: perplexity ({s.corpus}, {s.n_windows} x {s.seq_len}) {s.perplexity_before:.3f} -> "
          f"{s.perplexity_after:.3f} ({s.perplexity_change_pct:+.2f} %), arithmetic ({s.n_arithmetic} additions) "
          f"{s.arithmetic_before:.3f} -> {s.arithmetic_after:.3f} ({fmt(s.arithmetic_change_pct, '{:+.1f}')} %)")
    top = ", ".join(f"L{layer}.N{n}" for layer, n in result.ranking.neurons[:10])
    print(f"  top neurons: {top}")


def print_benchmarks(result: BiasBenchmarks) -> None:
    print("\nbenchmarks (lm-eval, local data):")
    for key, value in result.metrics().items():
        print(f"  {key:<36} {fmt(value, '{:.4f}')}")


def register(commands: Commands) -> None:
    parser = commands.model("bias", prepare_bias, corpus=True)
    parser.add_argument("--edit", action="store_true",
                        help="zero the CNA neurons behind the bias; judge on held-out prompts vs random draws")
    parser.add_argument("--neuron-fraction", type=float, default=None,
                        help="--edit: share of the scored layers' neurons zeroed (default 0.005)")
    parser.add_argument("--benchmarks", action="store_true", help="Winogender, WinoBias, CrowS-Pairs (local data)")
    parser.add_argument("--fraction", type=float, default=None,
                        help="--benchmarks: share of each task's documents (quick 0.25, thorough 1)")
    parser.add_argument("--thorough", action="store_true",
                        help="the checks' own defaults (the full profile) instead of the quick look")
