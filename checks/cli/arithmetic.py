"""``lmaudit heads`` (head sensitivity sweep) and ``lmaudit neurons`` (CNA scores, logit lens, comparison)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

from lmaudit.checks.core.arithmetic_problems import Operation
from lmaudit.checks.core.loading import load_model


def _load(args: argparse.Namespace, spec: str | None = None) -> Any:
    return load_model(spec or args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def cmd_heads(args: argparse.Namespace) -> int:
    """Ablate every attention head and report the accuracy drop per arithmetic operation."""
    from lmaudit.checks.arithmetic.checks import arithmetic_prompts
    from lmaudit.checks.arithmetic.head_sweep import head_sweep
    from lmaudit.checks.cli.output import print_json

    loaded = _load(args)
    problems = arithmetic_prompts(ops=args.ops, digits=args.digits, templates=args.templates,
                                  n_per_op=args.n_per_op, few_shot=args.few_shot, seed=args.seed)
    result = head_sweep(loaded.model, loaded.tokenizer, problems, threshold_points=args.threshold,
                        bounded=not args.exact_all, progress=not args.json)
    if args.json:
        print_json(result)
        return 0
    print("baseline accuracy per operation: "
          + ", ".join(f"{op} {100 * b:.1f}%" for op, b in zip(result.ops, result.baseline, strict=True)))
    print(f"{len(problems)} prompts, {len(result.layers) * len(result.accuracy[0])} heads, {result.seconds:.1f} s")
    print(f"critical heads (drop >= {args.threshold:g} points): "
          + (", ".join(f"L{layer}.H{head}" for layer, head in result.critical) or "none"))
    print(f"significant (sign test, p < {result.alpha:g}/{len(result.layers) * len(result.accuracy[0])}): "
          + (", ".join(f"L{layer}.H{head}" for layer, head in result.significant) or "none"))
    for row in result.top_head_rows(args.top):
        bound = "" if row.exact else "<= "
        print(f"  {row.name}: max drop {bound}{row.drop_points:.1f} points on {row.op} "
              f"({row.breaks} broken, {row.fixes if row.exact else '?'} fixed, p = {row.p_value:.2g})")
    return 0


def cmd_neurons(args: argparse.Namespace) -> int:
    """CNA: the most important FFN neurons for a target after a prompt, with their logit lens."""
    from lmaudit.checks.arithmetic.cna import compare_models
    from lmaudit.checks.cli.output import print_json
    from lmaudit.checks.core.neuron_scores import logit_lens, neuron_scores, top_neurons

    loaded = _load(args)
    target = args.target if args.target is not None else _symbolic_answer(args.prompt)
    if target is None:
        raise SystemExit("lmaudit neurons: give --target (the prompt does not end with a symbolic problem 'a+b=')")
    layers = args.layers or None
    if args.compare_model:
        other = _load(args, args.compare_model)
        comparison = compare_models(loaded.model, other.model, loaded.tokenizer, args.prompt, target, k=args.top,
                                    layers=layers, labels=(args.model, args.compare_model), lens=True)
        if args.json:
            print_json(comparison)
            return 0
        print(f"A = {args.model}, B = {args.compare_model}; top-{args.top} overlap {comparison.overlap:.2f}; "
              "lens = tokens m_A·fc2_k promotes / suppresses")
        print(f"{'neuron':>12} {'imp A':>8} {'imp B':>8} {'Δ':>8} {'coef A':>8} {'coef B':>8}  lens")
        for row in comparison.rows:
            print(f"L{row.layer:>3}.N{row.neuron:<6} {row.importance_a:8.3f} {row.importance_b:8.3f} "
                  f"{row.importance_delta:8.3f} {row.coefficient_a:8.3f} {row.coefficient_b:8.3f}  "
                  f"+{list(row.promotes)} -{list(row.suppresses)}")
        return 0
    scores = neuron_scores(loaded.model, loaded.tokenizer, args.prompt, target, layers=layers)
    rows = []
    for layer, neuron, importance in top_neurons(scores, args.top):
        coefficient = float(scores.coefficient[layer, neuron])
        top, bottom = logit_lens(loaded.adapter, loaded.tokenizer, layer, neuron, coefficient=coefficient, k=5)
        rows.append({"layer": layer, "neuron": neuron, "importance": importance, "coefficient": coefficient,
                     "promotes": [t for t, _ in top], "suppresses": [t for t, _ in bottom]})
    if args.json:
        print_json({"prompt": args.prompt, "target": target, "target_id": scores.target_id, "neurons": rows})
        return 0
    print(f"target {target!r} (token {scores.target_id}); importance = log p(target | r + m·fc2) − log p(target | r)")
    for row in rows:
        print(f"  L{row['layer']}.N{row['neuron']}: importance {row['importance']:.3f}, m {row['coefficient']:.3f}, "
              f"promotes {row['promotes']}, suppresses {row['suppresses']}")
    return 0


def _symbolic_answer(prompt: str) -> str | None:
    """The answer of a prompt whose last line is ``a op b=`` (e.g. ``"3+5="`` -> ``"8"``), else ``None``."""
    match = re.fullmatch(r"(\d+)\s*([-+*/])\s*(\d+)\s*=", prompt.splitlines()[-1].strip()) if prompt else None
    if match is None:
        return None
    a, op, b = int(match[1]), Operation.parse(match[2]), int(match[3])
    try:
        return str(op.apply(a, b))
    except Exception:  # e.g. an inexact division: no integer answer to score
        return None


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    heads = add("heads", cmd_heads)
    heads.add_argument("--ops", default="+-*/")
    heads.add_argument("--digits", type=int, nargs="+", default=[1])
    heads.add_argument("--n-per-op", type=int, default=32, help="per operation, digit count and template")
    heads.add_argument("--templates", nargs="+", default=["symbolic", "words"])
    heads.add_argument("--few-shot", type=int, default=4)
    heads.add_argument("--threshold", type=float, default=10.0, help="critical: drop >= this many points")
    heads.add_argument("--top", type=int, default=10)
    heads.add_argument("--exact-all", action="store_true",
                       help="run every head on every prompt (default: skip baseline-wrong prompts for heads proven "
                            "below the threshold; the critical set is the same)")
    heads.add_argument("--seed", type=int, default=0)
    neurons = add("neurons", cmd_neurons)
    neurons.add_argument("--prompt", required=True)
    neurons.add_argument("--target", default=None, help="default: the answer of a symbolic prompt like '3+5='")
    neurons.add_argument("--compare-model", default=None)
    neurons.add_argument("--layers", type=int, nargs="*", default=None)
    neurons.add_argument("--top", type=int, default=10)
