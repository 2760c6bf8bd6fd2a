"""``lmaudit superweights``: print the super-weight directory of a model (layer, row, col, value, activation)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict

from lmaudit.checks.core.loading import load_model
from lmaudit.checks.superweights.detect import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_PROMPT,
    DEFAULT_SPIKE_FACTOR,
    detect_super_weights,
)


def cmd_superweights(args: argparse.Namespace) -> int:
    """Detect the super weights of a model data-free and print their directory."""
    from lmaudit.checks.cli.output import print_json

    loaded = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    started = time.perf_counter()
    detection = detect_super_weights(loaded.adapter, loaded.tokenizer, args.prompt, spike_factor=args.spike_factor,
                                     max_depth=args.max_depth)
    seconds = time.perf_counter() - started
    rows = [{"layer": sw.layer, "row": sw.row, "col": sw.col, "weight": sw.weight, "activation": sw.activation,
             "input_activation": sw.input_activation, "token": sw.token} for sw in detection.super_weights]
    if args.json:
        print_json({"model": loaded.spec, "prompt": detection.prompt, "super_weights": rows,
                     "detection_seconds": seconds, "rounds": [asdict(r) for r in detection.rounds]})
        return 0
    print(f"{loaded.spec}: {len(rows)} super weight(s) in {seconds:.2f} s, prompt {detection.prompt!r}")
    if rows:
        print(f"{'layer':>5} {'row':>6} {'col':>6} {'value':>10} {'activation':>12}")
        for row in rows:
            print(f"{row['layer']:>5} {row['row']:>6} {row['col']:>6} {row['weight']:>10.4f} {row['activation']:>12.1f}")
    return 0


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("superweights", cmd_superweights)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="detection prompt (default: the paper's)")
    p.add_argument("--spike-factor", type=float, default=DEFAULT_SPIKE_FACTOR,
                   help="a spike layer's maxima are >= this times the median layer's")
    p.add_argument("--max-depth", type=float, default=DEFAULT_MAX_DEPTH, help="fraction of the layers searched")
