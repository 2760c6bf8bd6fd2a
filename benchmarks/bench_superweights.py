"""Super-weight audit speed: causal detection after load (how many passes it needs), batched vs one-by-one
multi-prompt detection (without BOS, as the invariance check runs it), and the layer-skip saving of the impact and
scaling re-evaluations (start at the super weights' layer from the cached clean hidden state vs recompute every
layer), in one run. Both paths must give the same detections and perplexities (checked).

    .venv/bin/python benchmarks/bench_superweights.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.loading import load_model
from lmaudit.checks.core.perplexity import corpus_windows
from lmaudit.checks.superweights.conditions import WindowCache, scale
from lmaudit.checks.superweights.detect import detect, detect_many
from lmaudit.checks.superweights.invariance import INVARIANCE_PROMPTS
from lmaudit.checks.superweights.scaling import PAPER_SCALES

OUT = Path(__file__).resolve().parent / "out"
T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded, load_s = timed(lambda: load_model(args.model))
    detect(loaded)  # warm-up
    detection, detect_s = timed(lambda: detect(loaded))
    passes = len(detection.rounds) + len(detection.tests)
    prompts = list(INVARIANCE_PROMPTS[: 4 if args.quick else len(INVARIANCE_PROMPTS)])
    batched, batched_s = timed(lambda: detect_many(loaded, prompts, bos=False))
    single, single_s = timed(lambda: [detect(loaded, p, bos=False) for p in prompts])
    assert [d.coordinate_set for d in batched] == [d.coordinate_set for d in single]

    seq_len, n_windows = (128, 4) if args.quick else (256, 8)
    windows = corpus_windows(loaded.tokenizer, load_corpus("pydoc"), seq_len, n_windows)
    coords = detection.coordinates
    layer = min(c[0] for c in coords)
    factors = [s for s in PAPER_SCALES if s != 1.0][: 3 if args.quick else None]
    skip_cache, cache_s = timed(lambda: WindowCache(loaded, windows, [layer]))
    full_cache = WindowCache(loaded, windows, [layer], layer_skip=False)

    def sweep(cache: WindowCache) -> list[float]:
        out = []
        for factor in factors:
            with scale(loaded.adapter, coords, factor):
                out.append(cache.perplexity(cache.nll(layer)))
        return out

    skip_ppl, skip_s = timed(lambda: sweep(skip_cache))
    full_ppl, full_s = timed(lambda: sweep(full_cache))
    for a, b in zip(skip_ppl, full_ppl, strict=True):
        assert abs(a - b) <= 1e-4 * b, (a, b)
    n = loaded.adapter.n_layers
    late = ", ".join(m.label() for m in detection.massive_activations) or "none"
    lines = [
        "## Super weights (`benchmarks/bench_superweights.py`)",
        "",
        f"Model `{args.model}` ({n} layers), loaded in {load_s:.1f} s. Super weights: {detection.labels()}; "
        f"massive activations ruled out by the causal test: {late}.",
        "",
        "| measurement | lmaudit | naive | ratio |",
        "|---|---|---|---|",
        f"| causal detection after load ({len(detection.rounds)} scans + {len(detection.tests)} causal tests = "
        f"{passes} forward passes) | {detect_s:.2f} s | – | – |",
        f"| detection on {len(prompts)} prompts without BOS: batched vs one by one | {batched_s:.2f} s | "
        f"{single_s:.2f} s | {single_s / batched_s:.2f}× |",
        f"| scaling sweep ({len(factors)} factors, {n_windows}×{seq_len} tokens): start at layer {layer} vs full "
        f"forward | {skip_s:.2f} s | {full_s:.2f} s | {full_s / skip_s:.2f}× |",
        "",
        f"The clean run that caches the hidden state entering layer {layer} took {cache_s:.2f} s (once per check). "
        f"Expected saving per re-evaluation ≈ {n}/{n - layer} = {n / (n - layer):.2f}× on the decoder layers (the "
        "embedding and the unembedding still run). Detections and perplexities of both paths agree (checked).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "superweights.md").write_text(text)


if __name__ == "__main__":
    main()
