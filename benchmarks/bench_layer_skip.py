"""The layer-skip saving: perplexity windows re-evaluated under an intervention at layer L, full forward vs
starting at layer L from the clean run's cached hidden state (``lmaudit.checks.core.layer_skip.start_at_layer``).

Both paths evaluate the same windows under the same intervention (a super-weight-style edit of one
``W_down`` element of layer L), in one run, alternating, and must give the same NLL (checked).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.interventions import set_down_proj_weight
from lmaudit.checks.core.layer_skip import clean_hidden_states, start_at_layer
from lmaudit.checks.core.loading import load_model

OUT = Path(__file__).resolve().parent / "out"


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    model, adapter = loaded.model, loaded.adapter
    ids = loaded.tokenizer(load_corpus("pydoc").text[:200_000], return_tensors="pt").input_ids[0]
    ids = ids[: args.windows * args.seq_len].view(args.windows, args.seq_len)
    _, hidden = clean_hidden_states(model, ids)
    n = adapter.n_layers
    layers = [1, n // 4, n // 2, 3 * n // 4, n - 1] if not args.quick else [n // 2]
    rows = []
    for layer in layers:
        with set_down_proj_weight(adapter, layer, 0, 0, value=0.0):
            model(input_ids=ids[:1], use_cache=False)  # warm-up
            t0 = time.perf_counter()
            full = model(input_ids=ids, use_cache=False).logits
            t1 = time.perf_counter()
            with start_at_layer(adapter, layer, hidden[layer]):
                skipped = model(input_ids=ids, use_cache=False).logits
            t2 = time.perf_counter()
        same = abs(nll(full, ids) - nll(skipped, ids)) <= 1e-3 * abs(nll(full, ids))
        rows.append((layer, t1 - t0, t2 - t1, same))
    total_full = sum(r[1] for r in rows)
    total_skip = sum(r[2] for r in rows)
    lines = [
        "## Layer skip: re-evaluation under an intervention at layer L (`benchmarks/bench_layer_skip.py`)",
        "",
        f"Model `{args.model}` ({n} layers), {args.windows} windows × {args.seq_len} tokens of `pydoc`; one "
        "`W_down` element of layer L zeroed; same NLL on both paths.",
        "",
        "| L | full forward (s) | start at L (s) | speed-up | expected ≈ n/(n−L) | same NLL |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for layer, full_s, skip_s, same in rows:
        lines.append(f"| {layer} | {full_s:.2f} | {skip_s:.2f} | {full_s / skip_s:.2f}x | {n / (n - layer):.2f}x | "
                     f"{'yes' if same else 'NO'} |")
    lines += ["", f"Over these layers: {total_full:.2f} s → {total_skip:.2f} s, "
              f"**{total_full / total_skip:.2f}x** faster (a sweep over every layer saves ≈ 2x: Σn/(n−L) averaged).", ""]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "layer_skip.md").write_text(text)
    assert all(r[3] for r in rows), "layer skip changed the result"


if __name__ == "__main__":
    main()
