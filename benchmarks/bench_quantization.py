"""Cost of a quantized perplexity evaluation against the full-precision one, and its peak memory.

For each scheme of ``lmaudit.checks.quantization.schemes`` (aware variant: the detector's super weights held out), in one run:

* time ratio = (weight fake-quantization on entry + ``window_nll`` of the windows, W8A8 quantizing activations
  on every forward) / ``window_nll`` of the full-precision model; target ≤ 1.3x. The VM's throughput drifts by
  up to ±50 % over seconds to minutes (full-precision runs of the same 4 windows measured 3.3-5.1 s back to
  back; an unchanged model measured 0.93-1.15x of itself between phases of one run), which swamps a 10 % cost
  when the two sides run minutes apart. So a second instance of the model is loaded and held quantized, and the
  two models evaluate the same window back to back, order alternating; each side is Σ over windows of that
  window's minimum over ``--repeats`` repetitions. The twin exists only for timing: every forward streams its
  own weights (≫ cache), so the twin does not change the cost of the other.
* peak memory = model bytes + (peak RSS − RSS on entry), RSS sampled every 5 ms from /proc/self/statm
  (``lmaudit.checks.quantization.schemes.MemoryMeter``), relative to the model's own size; target ≤ 2.5x. The full-precision
  evaluation is measured the same way, so the logits' and activations' share is visible.

The weight-only scheme runs with clipping z = inf (the search over z is calibration, not evaluation). Default
8 windows × 256 tokens: what the audit scores per quantization (4 windows of pydoc and of wikitext2, one
weight quantization per scheme).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.loading import load_model
from lmaudit.checks.core.perplexity import corpus_windows, perplexity_from_nll, window_nll
from lmaudit.checks.quantization.schemes import (
    ActivationGranularity,
    MemoryMeter,
    SuperOutliers,
    W8A8Scheme,
    WeightOnlyScheme,
    model_bytes,
    quantized,
)
from lmaudit.checks.superweights.detect import detect

OUT = Path(__file__).resolve().parent / "out"
TIME_TARGET, MEMORY_TARGET = 1.3, 2.5
BATCH = 1  # windows per forward, as in the audit (lmaudit.checks.quantization.checks.QuantEvalParams.batch_size)


def memory_in_fresh_process(args: argparse.Namespace, label: str | None) -> tuple[float, float]:
    """(peak memory / model size, PPL) of one evaluation in a new process ("" = full precision).

    A fresh process per scheme: in a process that already quantized, the allocator hands freed pages back to the
    next scheme's weight copies and the RSS growth under-states its need (measured 1.26x instead of 1.99x).
    """
    command = [sys.executable, __file__, "--model", args.model, "--seq-len", str(args.seq_len),
               "--windows", str(args.windows), "--memory-of", label or ""]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    ratio, ppl = json.loads(done.stdout.strip().splitlines()[-1])
    return ratio, ppl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=8)  # the audit scores 4 windows of each of 2 corpora per scheme
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one memory run, JSON on stdout
    args = parser.parse_args()
    if args.quick:
        args.windows, args.repeats = 4, 2
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    adapter = loaded.adapter
    windows = corpus_windows(loaded.tokenizer, load_corpus("pydoc"), args.seq_len, args.windows)
    outliers = SuperOutliers.from_detection(detect(loaded))
    size = model_bytes(loaded.model)
    copies = sum(m.weight.numel() * m.weight.element_size() for m in adapter.decoder_linears().values())
    schemes = [W8A8Scheme(ActivationGranularity.PER_TOKEN), W8A8Scheme(ActivationGranularity.PER_TENSOR),
               WeightOnlyScheme(bits=4, block_size=128**2)]
    window_nll(loaded.model, windows[:1], batch_size=BATCH)  # warm-up

    def memory_run(model: torch.nn.Module, scheme: object | None) -> tuple[float, float]:
        """(peak memory / model size, PPL) of one evaluation of the windows, quantized if ``scheme``."""
        with MemoryMeter() as meter, ExitStack() as stack:
            saved = stack.enter_context(quantized(adapter, scheme, outliers)) if scheme is not None else 0  # type: ignore[arg-type]
            nll = window_nll(model, windows, batch_size=BATCH)
        return meter.use(size, saved).peak_ratio, perplexity_from_nll(nll, windows)[0]

    def window_seconds(model: torch.nn.Module, i: int) -> float:
        t0 = time.perf_counter()
        window_nll(model, windows[i : i + 1], batch_size=BATCH)
        return time.perf_counter() - t0

    if args.memory_of is not None:
        scheme = next((s for s in schemes if s.label == args.memory_of), None)
        print(json.dumps(memory_run(loaded.model, scheme)))
        return

    # Time: the full-precision model and a quantized second instance, window by window, alternating.
    twin = load_model(args.model)
    window_nll(twin.model, windows[:1], batch_size=BATCH)
    rows: list[tuple[str, float, float, float, float, float]] = []  # label, PPL, seconds, quantizing s, FP s, memory
    fp_mem, fp_ppl = memory_in_fresh_process(args, None)
    fp_total = math.inf
    for scheme in schemes:
        t0 = time.perf_counter()
        with quantized(twin.adapter, scheme, outliers):  # type: ignore[arg-type]  # first entry: page faults
            quant_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with quantized(twin.adapter, scheme, outliers):  # type: ignore[arg-type]
            quant_s = min(quant_first, time.perf_counter() - t0)
            fp_best, q_best = [math.inf] * len(windows), [math.inf] * len(windows)
            for r in range(args.repeats):
                for i in range(len(windows)):
                    first, second = (loaded.model, twin.model) if (r + i) % 2 == 0 else (twin.model, loaded.model)
                    a, b = window_seconds(first, i), window_seconds(second, i)
                    fp_s_i, q_s_i = (a, b) if first is loaded.model else (b, a)
                    fp_best[i], q_best[i] = min(fp_best[i], fp_s_i), min(q_best[i], q_s_i)
        mem, ppl = memory_in_fresh_process(args, scheme.label)
        fp_total = min(fp_total, sum(fp_best))
        rows.append((scheme.label, ppl, quant_s + sum(q_best), quant_s, sum(fp_best), mem))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "## Quantization: cost of a quantized perplexity evaluation (`benchmarks/bench_quantization.py`)",
        "",
        f"Model `{args.model}` ({size / 1e6:.0f} MB of parameters), {args.windows} windows × {args.seq_len} tokens "
        f"of `pydoc`, one window per forward, aware variants (super weights {', '.join(map(str, outliers.weights)) or 'none'} held out); "
        f"time = weight quantization + Σ over windows of each window's minimum over {args.repeats} repetitions, the "
        f"full-precision model and a quantized second instance alternating window by window (the ratio is per "
        f"scheme, against its own interleaved full-precision windows); memory from one separate evaluation per "
        f"scheme in a fresh process, on the audit's single-model path; torch threads "
        f"{torch.get_num_threads()}; load average at the end "
        f"{load} (1, 5, 15 min) on {os.cpu_count()} CPUs.",
        "",
        "| scheme | PPL | time (s) | of which quantizing weights (s) | FP time, same interleaved windows (s) "
        "| time vs FP | peak memory vs model |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| full precision | {fp_ppl:.3f} | {fp_total:.2f} | - | - | 1.00x | {fp_mem:.2f}x |",
    ]
    ok = True
    for label, ppl, seconds, quant_s, fp_s, mem in rows:
        ratio = seconds / fp_s
        ok &= ratio <= TIME_TARGET and mem <= MEMORY_TARGET
        lines.append(
            f"| {label} | {ppl:.3f} | {seconds:.2f} | {quant_s:.2f} | {fp_s:.2f} | {ratio:.2f}x | {mem:.2f}x |")
    lines += [
        "",
        f"Targets: time ≤ {TIME_TARGET}x full precision, peak memory ≤ {MEMORY_TARGET}x the model "
        f"({'met' if ok else 'NOT met'}). Peak memory = model + (peak RSS − RSS on entry), RSS sampled every "
        f"5 ms; the weight copies kept for the exact restore are {copies / size:.2f}x of this model.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "quantization.md").write_text(text)


if __name__ == "__main__":
    main()
