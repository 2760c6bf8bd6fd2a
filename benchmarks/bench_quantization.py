"""Cost of a quantized perplexity evaluation against the full-precision one, and its peak memory.

For each scheme of ``checks.quantization`` (aware variant: the detector's super weights held out), in one run
and alternating with the full-precision evaluation of the same windows:

* time ratio = (weight fake-quantization on entry + ``window_nll`` of the windows, W8A8 quantizing activations
  on every forward) / ``window_nll`` of the full-precision model; target ≤ 1.3x. Each figure is the minimum
  of ``--repeats`` alternating repetitions (the machine is shared; the minimum is the least disturbed run).
* peak memory = model bytes + (peak RSS − RSS on entry), RSS sampled every 5 ms from /proc/self/statm
  (``checks.quantization.MemoryMeter``), relative to the model's own size; target ≤ 2.5x. The full-precision
  evaluation is measured the same way, so the logits' and activations' share is visible.

The weight-only scheme runs with clipping z = inf (the search over z is calibration, not evaluation). Default
8 windows × 256 tokens: what the audit scores per quantization (4 windows of pydoc and of wikitext2, one
weight quantization per scheme).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from pathlib import Path

import torch

from checks.corpora import load_corpus
from checks.loading import load_model
from checks.perplexity import corpus_windows, perplexity_from_nll, window_nll
from checks.quantization import (
    ActivationGranularity,
    MemoryMeter,
    SuperOutliers,
    W8A8Scheme,
    WeightOnlyScheme,
    model_bytes,
    quantized,
)
from checks.superweights import detect_super_weights

OUT = Path(__file__).resolve().parent / "out"
TIME_TARGET, MEMORY_TARGET = 1.3, 2.5
BATCH = 1  # windows per forward, as in the audit (checks.quantization_audit.QuantEvalParams.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)  # the audit scores 4 windows of each of 2 corpora per scheme
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.repeats = 4, 2
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    adapter = loaded.adapter
    windows = corpus_windows(loaded.tokenizer, load_corpus("pydoc"), args.seq_len, args.windows)
    outliers = SuperOutliers.from_detection(detect_super_weights(adapter, loaded.tokenizer))
    size = model_bytes(loaded.model)
    copies = sum(m.weight.numel() * m.weight.element_size() for m in adapter.decoder_linears().values())
    schemes = [W8A8Scheme(ActivationGranularity.PER_TOKEN), W8A8Scheme(ActivationGranularity.PER_TENSOR),
               WeightOnlyScheme(bits=4, block_size=128**2)]
    window_nll(loaded.model, windows[:1], batch_size=BATCH)  # warm-up

    def fp_run() -> tuple[float, float, float]:
        with MemoryMeter() as meter:
            t0 = time.perf_counter()
            nll = window_nll(loaded.model, windows, batch_size=BATCH)
            seconds = time.perf_counter() - t0
        return seconds, meter.use(size, 0).peak_ratio, perplexity_from_nll(nll, windows)[0]

    def q_run(scheme: object) -> tuple[float, float, float, float]:
        with MemoryMeter() as meter:
            t0 = time.perf_counter()
            with quantized(adapter, scheme, outliers) as saved:  # type: ignore[arg-type]
                t1 = time.perf_counter()
                nll = window_nll(loaded.model, windows, batch_size=BATCH)
            seconds = time.perf_counter() - t0
        return seconds, t1 - t0, meter.use(size, saved).peak_ratio, perplexity_from_nll(nll, windows)[0]

    fp_best = (math.inf, 0.0, 0.0)
    best: dict[str, tuple[float, float, float, float]] = {}
    for _ in range(args.repeats):
        for scheme in schemes:
            fp = fp_run()
            fp_best = (min(fp_best[0], fp[0]), max(fp_best[1], fp[1]), fp[2])
            q = q_run(scheme)
            old = best.get(scheme.label)
            best[scheme.label] = q if old is None else (min(old[0], q[0]), min(old[1], q[1]), max(old[2], q[2]), q[3])
    fp_s, fp_mem, fp_ppl = fp_best
    rss_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "## Quantization: cost of a quantized perplexity evaluation (`benchmarks/bench_quantization.py`)",
        "",
        f"Model `{args.model}` ({size / 1e6:.0f} MB of parameters), {args.windows} windows × {args.seq_len} tokens "
        f"of `pydoc`, one window per forward, aware variants (super weights {', '.join(map(str, outliers.weights)) or 'none'} held out); "
        f"minimum time / maximum memory over {args.repeats} alternating repetitions; torch threads "
        f"{torch.get_num_threads()} (activation quantization runs single-threaded); load average at the end "
        f"{load} (1, 5, 15 min) on {os.cpu_count()} CPUs.",
        "",
        "| scheme | PPL | time (s) | of which quantizing weights (s) | time vs FP | peak memory vs model |",
        "|---|---:|---:|---:|---:|---:|",
        f"| full precision | {fp_ppl:.3f} | {fp_s:.2f} | - | 1.00x | {fp_mem:.2f}x |",
    ]
    ok = True
    for label, (seconds, quant_s, mem, ppl) in best.items():
        ratio = seconds / fp_s
        ok &= ratio <= TIME_TARGET and mem <= MEMORY_TARGET
        lines.append(f"| {label} | {ppl:.3f} | {seconds:.2f} | {quant_s:.2f} | {ratio:.2f}x | {mem:.2f}x |")
    lines += [
        "",
        f"Targets: time ≤ {TIME_TARGET}x full precision, peak memory ≤ {MEMORY_TARGET}x the model "
        f"({'met' if ok else 'NOT met'}). Peak memory = model + (peak RSS − RSS on entry), RSS sampled every "
        f"5 ms; the weight copies kept for the exact restore are {copies / size:.2f}x of this model. "
        f"Whole-process maximum RSS "
        f"(Python, torch, tokenizer and everything): {rss_max / 1e6:.0f} MB = {rss_max / size:.2f}x the model.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "quantization.md").write_text(text)


if __name__ == "__main__":
    main()
