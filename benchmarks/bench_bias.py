"""Occupation-bias scoring cost: the prefix-cached scorer (distinct prompts of one length batched and run once,
one-token occupations read from the prompt pass, longer ones fed on the prompt batch's cache rows without their
last token) vs the plain batched ``continuation_logprob`` vs one pair at a time, in one run.

All three score the same (prompt, occupation) pairs of :mod:`lmaudit.checks.bias.scores`; the maximum absolute difference of
their log-probabilities is printed next to the timings (float rounding only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmaudit.checks.bias.occupations import TEMPLATES, occupation_table
from lmaudit.checks.bias.scores import prefix_cached_logprob, scoring_pairs
from lmaudit.checks.core.loading import load_model
from lmaudit.checks.core.logprobs import continuation_logprob

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--templates", type=int, default=2, help="templates scored (the audit scores all)")
    parser.add_argument("--quick", action="store_true", help="1 template; one-by-one on 1/4 of pairs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    n_templates = 1 if args.quick else args.templates
    pairs = sorted(set(scoring_pairs(TEMPLATES[:n_templates], occupation_table())))
    prompts, continuations = [p for p, _ in pairs], [c for _, c in pairs]
    single = pairs[: len(pairs) // 4] if args.quick else pairs  # the slow path on a subset in --quick
    continuation_logprob(model, tokenizer, prompts[:4], continuations[:4])  # warm-up

    timings = {}
    t0 = time.perf_counter()
    cached = prefix_cached_logprob(model, tokenizer, prompts, continuations)
    timings["prefix-cached (batch 32)"] = (time.perf_counter() - t0, len(pairs))
    t0 = time.perf_counter()
    plain = continuation_logprob(model, tokenizer, prompts, continuations)
    timings["continuation_logprob (batch 32)"] = (time.perf_counter() - t0, len(pairs))
    t0 = time.perf_counter()
    one = torch.cat([continuation_logprob(model, tokenizer, [p], [c], batch_size=1) for p, c in single])
    timings["one pair per forward pass"] = (time.perf_counter() - t0, len(single))
    diff = max(float((cached - plain).abs().max()), float((one - plain[: len(single)]).abs().max()))

    per_pair = {name: seconds / n for name, (seconds, n) in timings.items()}
    base = per_pair["one pair per forward pass"]
    lines = [
        "## Occupation-bias scoring (`benchmarks/bench_bias.py`)",
        "",
        f"Model `{args.model}`, {n_templates} template(s) × {len(occupation_table())} occupations "
        "× 2 genders = "
        f"{len(pairs)} (prompt, occupation) pairs, {len(set(prompts))} distinct prompts; "
        f"torch threads {torch.get_num_threads()}. Max |Δ log P| between methods: {diff:.2e}.",
        "",
        "| method | pairs | seconds | ms / pair | speed-up vs one-by-one |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, n) in timings.items():
        speedup = base / per_pair[name]
        lines.append(f"| {name} | {n} | {seconds:.2f} | {1000 * per_pair[name]:.1f} | {speedup:.1f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "bias.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
