"""``lmaudit neurons``: comparative neuron analysis (Yu & Ananiadou 2024) of the FFN neurons behind an answer.

    importance_k = log p(w | r + m_k·fc2_k) − log p(w | r)       (r: the residual stream at the last position)

Two modes:

- ``--prompt "3+5=" [--target 8]``: one prompt's neurons ranked by importance, each with its logit lens (the
  tokens ``m_k·fc2_k`` promotes and suppresses), in the last 20 % of the layers (``--thorough``: all); with ``--compare-model M2`` both models are scored on the same
  prompt and target and compared neuron by neuron (:func:`~lmaudit.checks.arithmetic.cna.compare_scores`).
- no prompt: the registered ``arithmetic_cna_intervention`` check (zero the top-k CNA neurons of the last 20 % of
  layers, ranked on held-out correctly answered problems, against ≥ 20 seeded random draws); with
  ``--compare-model`` the registered ``arithmetic_cna_compare`` (condition ``finetune``: the second model is the
  fine-tune). Quick look (default): :data:`QUICK`; ``--thorough`` runs the checks' own defaults.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmaudit.checks.cli.output import finish, fmt, print_header, table
from lmaudit.checks.cli.session import Action, Outcome, Session, UsageError, plan_checks, reject_param

if TYPE_CHECKING:
    from lmaudit.checks.arithmetic.cna import CnaComparison, InterventionCheck
    from lmaudit.checks.cli.commands import Commands

QUICK: dict[str, Any] = {"n_per_op": 8}  # audits/arithmetic.yaml, arithmetic_cna_top_neurons_matter, profile quick
# One prompt's quick look scores the layers the CNA checks score (the last 20 %: CnaParams.layer_fraction, where
# the answer neurons sit); --thorough or --layers scores others.
PROMPT_LAYER_FRACTION = 0.8


@dataclass(frozen=True)
class NeuronRow:
    layer: int
    neuron: int
    importance: float
    coefficient: float
    promotes: tuple[str, ...]
    suppresses: tuple[str, ...]


@dataclass(frozen=True)
class PromptNeurons:
    """One prompt's most important neurons for ``target`` (the first token of the answer), with their lens."""

    prompt: str
    target: str
    target_id: int
    normalizer: str
    neurons: tuple[NeuronRow, ...]


def prepare_neurons(args: argparse.Namespace) -> Action:
    """CNA: the FFN neurons behind an answer, with their logit lens; or the registered CNA checks."""
    if args.prompt is None:
        if args.target is not None or args.layers is not None:
            raise UsageError("--target and --layers apply to --prompt")
        name = "arithmetic_cna_compare" if args.compare_model else "arithmetic_cna_intervention"
        flags = {"k": args.top, "ops": args.ops, "normalizer": args.normalizer,
                 "condition": "finetune" if args.compare_model else None}
        (planned,) = plan_checks(args, [name], quick={name: QUICK}, flags=flags)

        def run_check(session: Session) -> int:
            def render(outcomes: list[Outcome]) -> None:
                print_header(session, f"check {name}")
                (print_comparison if args.compare_model else print_intervention)(outcomes[0].result)

            return finish("neurons", session, session.run_each([planned]), as_json=args.json, render=render)

        return run_check

    reject_param(args, "--prompt scores one prompt with the CNA science, not a registered check")
    if args.ops is not None:
        raise UsageError("--ops applies to the registered checks (without --prompt)")
    target = args.target if args.target is not None else symbolic_answer(args.prompt)
    if not target:
        raise UsageError("give --target: the prompt does not end with a symbolic problem such as '3+5='")
    top = args.top or 10
    normalizer = args.normalizer or "fixed"

    def run_prompt(session: Session) -> int:
        layers = args.layers
        if layers is None and not args.thorough:
            from lmaudit.checks.core.stats import layer_range

            layers = layer_range(session.model.adapter.n_layers, PROMPT_LAYER_FRACTION)
        if args.compare_model:
            other = session.other(args.compare_model)
            comparison = session.science("CNA of two models", lambda: compare_on_prompt(
                session, other, args.prompt, target, layers=layers, k=top, normalizer=normalizer))
            outcome = Outcome(comparison)

            def render(outcomes: list[Outcome]) -> None:
                print_header(session, f"CNA of {args.prompt!r} -> {target!r}, against {args.compare_model}")
                print_comparison(outcomes[0].result)
        else:
            found = session.science("CNA", lambda: prompt_neurons(session, args.prompt, target, layers=layers,
                                                                   k=top, normalizer=normalizer))
            outcome = Outcome(found)

            def render(outcomes: list[Outcome]) -> None:
                print_header(session, f"CNA of {args.prompt!r}")
                print_prompt_neurons(outcomes[0].result)

        return finish("neurons", session, [outcome], as_json=args.json, render=render)

    return run_prompt


def prompt_neurons(session: Session, prompt: str, target: str, *, layers: list[int] | None, k: int,
                   normalizer: str) -> PromptNeurons:
    from lmaudit.checks.core.neuron_scores import logit_lens, neuron_scores, top_neurons

    loaded = session.model
    scores = neuron_scores(loaded.model, loaded.tokenizer, prompt, target, layers=layers, adapter=loaded.adapter,
                           normalizer=normalizer)  # type: ignore[arg-type]
    rows = []
    for layer, neuron, importance in top_neurons(scores, k):
        coefficient = float(scores.coefficient[layer, neuron])
        up, down = logit_lens(loaded.adapter, loaded.tokenizer, layer, neuron, coefficient=coefficient, k=5)
        rows.append(NeuronRow(layer, neuron, importance, coefficient, tuple(t for t, _ in up),
                              tuple(t for t, _ in down)))
    return PromptNeurons(prompt, target, scores.target_id, normalizer, tuple(rows))


def compare_on_prompt(session: Session, other: Any, prompt: str, target: str, *, layers: list[int] | None, k: int,
                      normalizer: str) -> CnaComparison:
    """Both models scored on the same prompt and target, compared neuron by neuron (lens of the first)."""
    from lmaudit.checks.arithmetic.cna import compare_scores
    from lmaudit.checks.core.neuron_scores import neuron_scores

    a, b = (neuron_scores(m.model, m.tokenizer, prompt, target, layers=layers, adapter=m.adapter,
                          normalizer=normalizer)  # type: ignore[arg-type]
            for m in (session.model, other))
    return compare_scores(a, b, k=k, labels=(session.model.spec, other.spec),
                          lens=(session.model.adapter, session.model.tokenizer), n_prompts=1,
                          condition="compare-model")


def symbolic_answer(prompt: str) -> str | None:
    """The answer of a prompt whose last line is ``a op b=`` (``"3+5="`` -> ``"8"``), else ``None``."""
    from lmaudit.checks.core.arithmetic_problems import Operation

    lines = prompt.splitlines()
    match = re.fullmatch(r"(\d+)\s*([-+*/])\s*(\d+)\s*=", lines[-1].strip()) if lines else None
    if match is None:
        return None
    try:
        return str(Operation.parse(match[2]).apply(int(match[1]), int(match[3])))
    except (ArithmeticError, ValueError):  # an inexact division: no integer answer to score
        return None


def print_prompt_neurons(found: PromptNeurons) -> None:
    print(f"target {found.target!r} (token {found.target_id}), {found.normalizer} final-norm scale; "
          "importance = log p(target | r + m·fc2) − log p(target | r)")
    rows = [(f"L{r.layer}.N{r.neuron}", fmt(r.importance, "{:.3f}"), fmt(r.coefficient, "{:.3f}"),
             " ".join(repr(t) for t in r.promotes), " ".join(repr(t) for t in r.suppresses)) for r in found.neurons]
    print(table(("neuron", "importance", "m", "promotes", "suppresses"), rows, indent="  "))


def print_comparison(comparison: CnaComparison) -> None:
    print(f"A = {comparison.label_a}, B = {comparison.label_b} ({comparison.n_prompts} prompt(s), "
          f"{comparison.n_neurons} neurons); top-{comparison.k} overlap {comparison.top_overlap:.2f}, importance "
          f"retention {fmt(comparison.importance_retention, '{:.3f}')}, coefficient gain "
          f"{fmt(comparison.coefficient_gain, '{:.3f}')}; lens = tokens m_A·fc2_k promotes / suppresses")
    rows = [(f"L{r.layer}.N{r.neuron}", fmt(r.importance_a, "{:.3f}"), fmt(r.importance_b, "{:.3f}"),
             fmt(r.importance_delta, "{:+.3f}"), fmt(r.coefficient_a, "{:.3f}"), fmt(r.coefficient_b, "{:.3f}"),
             " ".join(repr(t) for t in r.promotes), " ".join(repr(t) for t in r.suppresses))
            for r in comparison.rows[:20]]
    print(table(("neuron", "imp A", "imp B", "Δ", "coef A", "coef B", "promotes", "suppresses"), rows, indent="  "))


def print_intervention(result: InterventionCheck) -> None:
    c = result.control
    print(f"top {result.k} CNA neurons of layers {result.layers[0]}-{result.layers[-1]} zeroed ({result.n_prompts} "
          f"problems, ranked on {result.n_scoring_prompts} others): accuracy {result.baseline_accuracy:.3f} -> "
          f"{result.top_zeroed_accuracy:.3f} (drop {result.top_drop_points:.1f} points)")
    print(f"{c.n} random draws: drop {c.mean:.1f} ± {c.std:.1f} points [{c.min:.1f}, {c.max:.1f}], upper bound "
          f"{result.control_drop_upper_points:.1f}; top beyond it {result.top_drop_over_control_upper_points:+.1f} "
          f"points, empirical p = {result.control_p:.3g}")
    print("top neurons: " + ", ".join(f"L{layer}.N{n} ({importance:.3f})" for layer, n, importance in result.top[:10]))


def register(commands: Commands) -> None:
    parser = commands.model("neurons", prepare_neurons)
    parser.add_argument("--prompt", default=None, help="score one prompt (default: the registered CNA check)")
    parser.add_argument("--target", default=None, help="--prompt's answer; default: that of a symbolic 'a+b='")
    parser.add_argument("--compare-model", default=None, help="a second model (e.g. a fine-tune) to compare with")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="--prompt: layers scored (quick: the last 20 %%; thorough: all)")
    parser.add_argument("--top", type=int, default=None, help="neurons listed / k of the check (default 10 / 20)")
    parser.add_argument("--ops", default=None, help="operations of the registered check, e.g. '+-'")
    parser.add_argument("--normalizer", choices=("fixed", "per_neuron"), default=None,
                        help="final-norm scale: the paper's fixed one (default) or re-applied per neuron")
    parser.add_argument("--thorough", action="store_true",
                        help="the checks' own defaults (the full profile) instead of the quick look")
