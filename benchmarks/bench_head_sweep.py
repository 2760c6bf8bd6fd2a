"""Benchmark: fast head sweep vs the naive deep-copy-per-head sweep on the default model, in one run.

    .venv/bin/python benchmarks/bench_head_sweep.py            # fast sweep on a layer sample, naive on a head sample
    .venv/bin/python benchmarks/bench_head_sweep.py --full     # fast sweep on all 270 heads
    .venv/bin/python benchmarks/bench_head_sweep.py --quick    # smaller samples

Data: 1-digit + - * /, half symbolic and half words template (1-digit - has only 55 problems), symbolic template, 4 shared few-shot examples, 64 prompts per operation (256 prompts).
Both sweeps evaluate exactly the same token ids with the same teacher-forced greedy check. The naive sweep deep-
copies the model per head and zeroes that head's W_O columns (the paper's code does this per head and prompt).
Per-head times are extrapolated to all heads where a sample is run; the output says which numbers are measured
and which extrapolated, and checks that the accuracies of every head run by both methods are identical.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from checks.arithmetic_audit import arithmetic_prompts  # noqa: E402
from checks.arithmetic_eval import encode_problems  # noqa: E402
from checks.head_sweep import naive_correct, sweep_correct  # noqa: E402
from checks.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-per-op", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="fast sweep over every layer")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--naive-heads", type=int, default=None, help="heads the naive loop runs (sampled)")
    args = parser.parse_args()

    loaded = load_model(args.model)
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    n_layers, n_heads = adapter.n_layers, adapter.heads.n_heads
    problems = arithmetic_prompts(ops="+-*/", digits=[1], templates=["symbolic", "words"],
                                  n_per_op=args.n_per_op // 2, few_shot=4, seed=0)
    encoded = encode_problems(tokenizer, problems)
    keys = [(p.op.symbol, p.template.value) for p in problems]
    group_ids = [sorted(set(keys)).index(k) for k in keys]
    # Evenly spaced layers from first to last: their mean number of layers run from L on, (n_layers − L), is the
    # full sweep's mean, so the per-head cost of the sample is representative of all heads.
    n_sample = n_layers if args.full else (2 if args.quick else 4)
    layers = sorted({round(i * (n_layers - 1) / max(1, n_sample - 1)) for i in range(n_sample)})
    n_naive = args.naive_heads or (1 if args.quick else 3)
    naive_heads = [(layers[i * len(layers) // n_naive], (4 * i + 1) % n_heads) for i in range(n_naive)]

    # Fixed costs (once per sweep, amortized over all heads) are timed apart from the per-head costs.
    start = time.perf_counter()
    sweep_correct(model, tokenizer, encoded, group_ids, layers=[])
    fast_fixed = time.perf_counter() - start
    start = time.perf_counter()
    baseline, fast = sweep_correct(model, tokenizer, encoded, group_ids, layers=layers, progress=True)
    fast_layers = time.perf_counter() - start - fast_fixed  # the same clean passes ran again inside
    start = time.perf_counter()
    naive_base, _ = naive_correct(model, tokenizer, encoded, [])
    naive_fixed = time.perf_counter() - start
    start = time.perf_counter()
    _, naive = naive_correct(model, tokenizer, encoded, naive_heads)
    naive_heads_seconds = time.perf_counter() - start - naive_fixed  # its clean baseline ran again inside

    identical = torch.equal(baseline, naive_base) and all(
        torch.equal(fast[layer, head], naive[i]) for i, (layer, head) in enumerate(naive_heads))
    total_heads = n_layers * n_heads
    fast_per_head = fast_layers / (len(layers) * n_heads)
    naive_per_head = naive_heads_seconds / len(naive_heads)
    fast_total = fast_fixed + fast_per_head * total_heads
    naive_total = naive_fixed + naive_per_head * total_heads
    measured = "measured" if args.full else "extrapolated"
    lines = [
        "## Head sweep (arithmetic)",
        "",
        f"Model `{args.model}`, {len(problems)} prompts (1-digit + - * /, symbolic and words templates, 4 shared "
        f"few-shot examples), {total_heads} heads; torch threads {torch.get_num_threads()}; machine load "
        f"{os.getloadavg()[0]:.1f} at the end (2 cores shared with other jobs: absolute seconds are inflated, "
        "both methods alike).",
        "",
        "| method | fixed s (clean passes) | heads timed | s / head | all heads (s) |",
        "|---|---|---|---|---|",
        f"| fast (prefix cache + layer skip + batched heads) | {fast_fixed:.1f} | {len(layers) * n_heads} "
        f"(all heads of layers {layers}) | {fast_per_head:.2f} | {fast_total:.0f} ({measured}) |",
        f"| naive (deep copy per head, full prompts) | {naive_fixed:.1f} | {len(naive_heads)} {naive_heads} | "
        f"{naive_per_head:.2f} | {naive_total:.0f} (extrapolated) |",
        "",
        f"Speed-up, whole sweep: **{naive_total / fast_total:.1f}x** (per head {naive_per_head / fast_per_head:.1f}x). "
        "The layer sample is evenly spaced from the first to the last layer, so its mean number of layers run "
        "per ablation equals the full sweep's.",
        f"Identical per-prompt correctness on every head run by both methods, and on the baseline: **{identical}**.",
        f"Baseline accuracy: {baseline.float().mean():.3f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "out" / "head_sweep.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
