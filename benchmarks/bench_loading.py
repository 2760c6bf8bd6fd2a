"""Cold vs warm load of the default model, each in a fresh Python process (as a user's run sees it).

cold: an empty cache dir (``LMAUDIT_CACHE`` pointed at a new temporary directory): read the GGUF, dequantize,
      write the safetensors cache entry, load it.
warm: the same cache dir again: load the cached safetensors.
Reported: wall time of ``load_model`` inside the process (``LoadedModel.load_seconds``) and of the whole process
(interpreter start + imports + load), median of ``--repeats`` warm runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CHILD = (
    "import json, time; t=time.perf_counter(); import torch, transformers; "
    "from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM; "
    "imports=time.perf_counter()-t; from lmaudit.checks.core.loading import load_model; "
    "m=load_model({spec!r}); print(json.dumps({{'load_s': m.load_seconds, 'cache_hit': m.cache_hit, "
    "'imports_s': imports, 'in_process_s': time.perf_counter()-t}}))"
)


def one_load(spec: str, cache: str) -> dict[str, float]:
    env = {**os.environ, "LMAUDIT_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(spec=spec)], env=env, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmaudit-bench-cache-") as cache:
        cold = one_load(args.model, cache)
        warm = [one_load(args.model, cache) for _ in range(1 if args.quick else args.repeats)]
    assert not cold["cache_hit"] and all(w["cache_hit"] for w in warm)
    warm_load = statistics.median(w["load_s"] for w in warm)
    warm_proc = statistics.median(w["process_s"] for w in warm)
    warm_imports = statistics.median(w["imports_s"] for w in warm)
    lines = [
        "## Model load: cold vs warm (`benchmarks/bench_loading.py`)",
        "",
        f"Model `{args.model}`; each load in a fresh process; warm = median of {len(warm)}.",
        "",
        "| | `load_model` after importing torch + transformers (s) | import torch + transformers (s) "
        "| whole process (s) |",
        "|---|---:|---:|---:|",
        f"| cold (dequantize GGUF + write cache) | {cold['load_s']:.2f} | {cold['imports_s']:.2f} "
        f"| {cold['process_s']:.2f} |",
        f"| warm (cached safetensors) | {warm_load:.2f} | {warm_imports:.2f} | {warm_proc:.2f} |",
        f"| cold / warm | {cold['load_s'] / warm_load:.1f}x | | {cold['process_s'] / warm_proc:.1f}x |",
        "",
        f"Target: warm load ≤ 3 s → {'met' if warm_load <= 3.0 else 'NOT met'} for `load_model` itself "
        f"({warm_load:.2f} s); a fresh process also pays {warm_imports:.2f} s of torch/transformers imports that "
        "any tool using them pays (in a pytest session they are paid once).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / "loading.md").write_text(text)


if __name__ == "__main__":
    main()
