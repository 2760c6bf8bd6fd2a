"""How close the audit's three main passes come to this machine's matmul limit, and where the rest of the time goes.

    .venv/bin/python benchmarks/bench_flops.py                     # default model, the audit's full settings
    .venv/bin/python benchmarks/bench_flops.py --model gemma3-270m
    .venv/bin/python benchmarks/bench_flops.py --quick             # smaller passes (smoke run)

**Peak.** The best of ``--repeats`` ``torch.matmul`` of two ``n × n`` float32 matrices (``2n³`` FLOPs) at torch's
thread count, the same threads the passes use.

**Work of a pass** (:class:`WorkCounter`), counted while it runs by forward pre-hooks on every decoder layer and
on the unembedding, so layer skipping, prefix caches and the judge's partial unembedding are counted as they
happen::

    F = Σ_{calls of layer ℓ} 2·P_ℓ·rows                                 P_ℓ: weights of layer ℓ's Linear modules
      + Σ_{calls of layer ℓ} 4·d_attn·Σ_{queries} keys attended          QKᵀ and A·V, causal
      + Σ_{calls of the unembedding} 2·d·V·rows

``rows`` = batch × query tokens (padding included: it is computed). For one full forward of a ``seq``-token
window this is, per token, ``2·N_lin + 2·d·V + 2·n_layers·(seq+1)·d_attn``: twice the non-embedding parameters
that do matmuls, plus the unembedding, plus attention at the mean causal context (Kaplan et al. 2020's forward
count, with the unembedding and without the embedding lookup).

**CNA's own work** is not a module call: per scored layer ``U = W_U·lin(v̂)`` (``2·I·d·V``), ``a = W_U·lin(r)``
(``2·B·d·V``) and the cumulant moments (``2·I·V·3B`` for the fixed normaliser, ``2·I·V·6B`` per neuron), where
``B`` is the number of scoring prompts (:mod:`lmaudit.checks.core.neuron_scores`). Those matmuls are counted
exactly by ``torch.utils.flop_counter.FlopCounterMode`` in a separate, untimed pass; the exact ``logsumexp`` of
the (prompt, neuron) pairs outside the cumulant shortcut is elementwise work and is not counted as FLOPs.

**Where the rest goes.** Each pass runs once more under ``torch.profiler``: the time of the operators called from
Python (profiler roots, children included) is grouped into matmuls, attention, softmax/logsumexp/cross-entropy
over the vocabulary, elementwise arithmetic, data movement (copies, cat, indexing) and the rest; what is left of
the wall time is spent outside torch operators (Python: the model's modules, hooks, the harness). The profiler
adds a few microseconds per operator, so the split is approximate; the head sweep is profiled on its last fifth
of layers only (its event list over every layer is too large).

Utilisation = F / seconds / peak. The passes: ``perplexity`` (the registered check, the audit's full settings),
``arithmetic_head_sweep`` (the registered check, full settings: screen every head, confirm candidates) and the
CNA scoring pass (:func:`lmaudit.checks.arithmetic.cna.score_states` on the audit's held-out scoring problems,
both normalisers, as ``arithmetic_cna_*`` computes it once per session), all in one process, one after another.
Writes ``benchmarks/out/flops_<model>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lmaudit.checks.core.hooks import hooks  # noqa: E402
from lmaudit.checks.core.loading import LoadedModel, load_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def load_average() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


# ------------------------------------------------------------------------------------------------ peak


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of ``repeats`` ``torch.matmul`` of two ``n × n`` float32 matrices (``2n³`` FLOPs)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)  # warm-up: thread pool, pages of ``out``
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


# ------------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class ModelShape:
    """What a forward pass costs, read from the loaded model (never typed in)."""

    name: str
    n_layers: int
    hidden: int  # d
    intermediate: int  # I
    vocab: int  # V: rows of the unembedding
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_linear: tuple[int, ...]  # P_ℓ: weights of each decoder layer's Linear modules
    embedding: int  # parameters of the input embedding (a lookup, no FLOPs)
    parameters: int  # unique parameters (tied embeddings once)
    tied: bool

    @property
    def d_attn(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def linear(self) -> int:
        """N_lin: the non-embedding weights that do matmuls."""
        return sum(self.layer_linear)

    @property
    def unembedding(self) -> int:
        return self.hidden * self.vocab

    def flops_per_token(self, seq: int) -> float:
        """``2·N_lin + 2·d·V + 2·n_layers·seq·d_attn``: one token of a full forward of a ``seq``-token sequence."""
        return 2 * self.linear + 2 * self.unembedding + 2 * self.n_layers * seq * self.d_attn

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelShape:
        adapter = loaded.adapter
        per_layer = [0] * adapter.n_layers
        for name, module in adapter.decoder_linears().items():
            index = int(name.removeprefix(adapter.layers_path + ".").split(".")[0])
            per_layer[index] += adapter.weight(module).numel()
        return cls(name=loaded.spec, n_layers=adapter.n_layers, hidden=adapter.hidden_size,
                   intermediate=adapter.intermediate_size, vocab=adapter.weight(adapter.unembedding).shape[0],
                   n_heads=adapter.heads.n_heads, n_kv_heads=adapter.heads.n_kv_heads,
                   head_dim=adapter.heads.head_dim, layer_linear=tuple(per_layer),
                   embedding=adapter.embedding.weight.numel(), parameters=adapter.parameter_count,
                   tied=adapter.tied_embeddings)


# ------------------------------------------------------------------------------------------------ counting


@dataclass
class Work:
    """What the model computed while a :class:`WorkCounter` was active (module docstring)."""

    layer_rows: int = 0  # Σ over decoder-layer calls of batch × query tokens
    layer_flops: float = 0.0  # their Linear matmuls: Σ 2·P_ℓ·rows
    attention_flops: float = 0.0  # QKᵀ and A·V
    unembedding_rows: int = 0
    unembedding_flops: float = 0.0
    per_layer_rows: list[int] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return self.layer_flops + self.attention_flops + self.unembedding_flops

    def token_equivalents(self, n_layers: int) -> float:
        """Tokens through the whole decoder stack that did as much layer work: Σ rows over layers / n_layers."""
        return self.layer_rows / n_layers


class WorkCounter:
    """Counts the matmul work of every forward pass while active (forward pre-hooks through
    :func:`lmaudit.checks.core.hooks.hooks`; a few microseconds per layer call)."""

    def __init__(self, loaded: LoadedModel, shape: ModelShape) -> None:
        self.loaded, self.shape = loaded, shape
        self.work = Work(per_layer_rows=[0] * shape.n_layers)

    def _layer_hook(self, index: int) -> Callable[..., None]:
        shape, work = self.shape, self.work

        def count(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, queries = int(hidden.shape[0]), int(hidden.shape[1])
            mask = kwargs.get("attention_mask")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if torch.is_tensor(mask) and mask.dim() == 4:
                keys = int(mask.shape[-1])
            elif cache is not None and hasattr(cache, "get_seq_length"):
                keys = int(cache.get_seq_length(index)) + queries
            else:
                keys = queries
            past = keys - queries  # query i (1-based) attends to past + i keys
            attended = queries * past + queries * (queries + 1) // 2
            work.layer_rows += batch * queries
            work.per_layer_rows[index] += batch * queries
            work.layer_flops += 2.0 * shape.layer_linear[index] * batch * queries
            work.attention_flops += 4.0 * shape.d_attn * batch * attended

        return count

    def _unembedding_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows = args[0].numel() // self.shape.hidden
        self.work.unembedding_rows += rows
        self.work.unembedding_flops += 2.0 * self.shape.hidden * self.shape.vocab * rows

    @contextmanager
    def counting(self) -> Iterator[Work]:
        adapter = self.loaded.adapter
        pre = [(layer, self._layer_hook(i)) for i, layer in enumerate(adapter.layer_list)]
        pre.append((adapter.unembedding, self._unembedding_hook))
        with hooks(pre=pre):
            yield self.work


@contextmanager
def counted(loaded: LoadedModel, shape: ModelShape) -> Iterator[Work]:
    """``with counted(loaded, shape) as work:`` the forward work of the block (:class:`WorkCounter`)."""
    with WorkCounter(loaded, shape).counting() as work:
        yield work


def matmul_flops(run: Callable[[], object]) -> float:
    """FLOPs of the aten matmuls (mm, addmm, bmm, ...) ``run()`` performs, by ``FlopCounterMode`` (slower: untimed).
    CPU scaled-dot-product attention is not among the operators it counts."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------ profile

CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul (Linear, mm, bmm)": ("linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "addmv", "mv", "dot",
                                 "einsum", "_addmm_activation"),
    "attention (SDPA)": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                         "_scaled_dot_product_attention_math"),
    "softmax / logsumexp / cross-entropy over the vocabulary": (
        "logsumexp", "log_softmax", "_log_softmax", "softmax", "_softmax", "cross_entropy_loss", "nll_loss",
        "nll_loss_nd", "nll_loss_forward", "topk", "argmax", "max", "amax", "aminmax", "sort"),
    "data movement (copy, cat, index, pad)": (
        "copy_", "to", "_to_copy", "contiguous", "clone", "cat", "stack", "index", "index_select", "gather",
        "scatter", "index_put_", "repeat", "repeat_interleave", "expand", "narrow", "slice", "select", "view",
        "reshape", "transpose", "t", "permute", "unsqueeze", "squeeze", "flatten", "split", "chunk", "embedding",
        "empty", "zeros", "ones", "full", "arange", "fill_", "zero_", "new_zeros", "new_empty", "masked_fill",
        "where", "nonzero", "unbind", "as_strided", "_unsafe_view", "item", "_local_scalar_dense", "tril",
        "triu", "constant_pad_nd", "pad", "resize_", "set_", "detach", "lift_fresh"),
}


def categorize(name: str) -> str:
    """The category of an aten operator (``aten::mm`` → matmul); unknown arithmetic counts as elementwise."""
    op = name.removeprefix("aten::")
    for category, names in CATEGORIES.items():
        if op in names:
            return category
    return "elementwise and reductions (norms, activations, exp, sum)" if name.startswith("aten::") else "other"


@dataclass(frozen=True)
class Profile:
    wall: float
    seconds: dict[str, float]  # category -> seconds in root operators of that category
    top: list[tuple[str, float]]  # the heaviest root operators

    @property
    def outside(self) -> float:
        return max(0.0, self.wall - sum(self.seconds.values()))


def profile(run: Callable[[], object]) -> Profile:
    """``run()`` under ``torch.profiler``: the self-and-children time of each root operator, by category."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    started = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    wall = time.perf_counter() - started
    seconds: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.cpu_parent is not None or not event.name.startswith("aten::"):
            continue
        seconds[categorize(event.name)] += event.cpu_time_total / 1e6
        per_op[event.name] += event.cpu_time_total / 1e6
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return Profile(wall, dict(seconds), top)


# ------------------------------------------------------------------------------------------------ passes


@dataclass
class PassResult:
    name: str
    settings: str
    seconds: float  # best of the timed runs
    runs: list[float]
    forward_flops: float  # from the WorkCounter
    extra_flops: float  # CNA's per-neuron logit work (matmuls outside module calls)
    work: dict[str, Any]
    load: str  # load average (1/5/15 min) before the pass
    profile: dict[str, Any] | None = None

    @property
    def flops(self) -> float:
        return self.forward_flops + self.extra_flops


def _time(run: Callable[[], object], repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        runs.append(time.perf_counter() - started)
    return runs


def measure_pass(loaded: LoadedModel, shape: ModelShape, name: str, settings: str, run: Callable[[], object], *,
                 repeats: int, extra: Callable[[], float] | None = None,
                 profiled: Callable[[], object] | None = None) -> PassResult:
    """Time ``run`` (best of ``repeats``, the first with the work counter on), count its work, profile it."""
    load = load_average()
    with counted(loaded, shape) as work:
        runs = _time(run, 1)
    runs += _time(run, repeats - 1)
    extra_flops = extra() if extra is not None else 0.0
    prof = profile(profiled or run)
    return PassResult(name, settings, min(runs), runs, work.flops, extra_flops,
                      {"layer_rows": work.layer_rows, "token_equivalents": work.token_equivalents(shape.n_layers),
                       "unembedding_rows": work.unembedding_rows,
                       "layer_flops": work.layer_flops, "attention_flops": work.attention_flops,
                       "unembedding_flops": work.unembedding_flops},
                      load, {"wall": prof.wall, "seconds": prof.seconds, "outside": prof.outside, "top": prof.top})


def main_passes(loaded: LoadedModel, shape: ModelShape, *, quick: bool, repeats: int) -> list[PassResult]:
    """Perplexity, the head sweep and the CNA scoring pass with the audit's full settings (smaller with ``quick``)."""
    from lmaudit.checks.arithmetic.checks import CnaParams
    from lmaudit.checks.arithmetic.cna import score_states, scoring_problems
    from lmaudit.checks.catalog import load_checks
    from lmaudit.checks.core.arithmetic_problems import problem_key
    from lmaudit.checks.core.stats import derived_seed
    from lmaudit.checks.harness.context import AuditContext

    checks = load_checks()
    results = []

    ppl = checks["perplexity"]
    ppl_params = ppl.params(**({"n_windows": 4} if quick else {}))
    results.append(measure_pass(
        loaded, shape, "perplexity", f"{ppl_params.n_windows} windows × {ppl_params.seq_len} tokens, batch "
        f"{ppl_params.batch_size}", lambda: ppl.run(AuditContext(model=loaded), ppl_params), repeats=repeats))

    sweep = checks["arithmetic_head_sweep"]
    sweep_params = sweep.params(**({"n_per_op": 4, "confirm_per_op": 8, "layer_fraction": (0.8, 1.0)}
                                   if quick else {}))
    profiled_params = sweep_params.model_copy(update={"layer_fraction": (0.8, 1.0)})
    layers = sweep_params.layer_fraction
    results.append(measure_pass(
        loaded, shape, "head sweep", f"{sweep_params.n_per_op} screening + {sweep_params.confirm_per_op} × "
        f"{len(sweep_params.confirm_templates)} confirming prompts per operation, layer fractions {layers[0]:g}–"
        f"{layers[1]:g} of the depth", lambda: sweep.run(AuditContext(model=loaded), sweep_params), repeats=1,
        profiled=lambda: sweep.run(AuditContext(model=loaded), profiled_params)))

    # The CNA scoring set as the arithmetic checks build it: held-out problems the model answers correctly.
    params = CnaParams(**({"n_score": 4, "score_pool": 12, "min_score": 8} if quick else {}))
    context = AuditContext(model=loaded)
    judged = frozenset(problem_key(p) for p in params.evaluated(context))
    candidates = params.draw(derived_seed(context.seed, "rank"), n_per_op=params.score_pool, exclude=judged)
    problems = scoring_problems(loaded, candidates, per_cell=params.n_score, min_prompts=1)
    cna_layers = params.layers(context)

    def cna() -> object:
        return score_states(loaded, problems, cna_layers, normalizers=("fixed", "per_neuron"))

    def cna_extra() -> float:
        with counted(loaded, shape) as work:
            total = matmul_flops(cna)
        return total - work.layer_flops - work.unembedding_flops  # the forward's own matmuls are counted apart

    results.append(measure_pass(
        loaded, shape, "CNA scoring", f"{len(problems)} prompts, layers {cna_layers[0]}–{cna_layers[-1]} "
        f"({len(cna_layers)} of {shape.n_layers}), both normalisers", cna, repeats=repeats, extra=cna_extra))
    results[-1].work["cna_prompts"] = len(problems)
    results[-1].work["cna_layers"] = len(cna_layers)
    return results


# ------------------------------------------------------------------------------------------------ report


def cna_formula(shape: ModelShape, n_layers: int, prompts: int) -> float:
    """CNA's per-neuron logit work in matmul FLOPs (module docstring): per layer ``2·I·d·V + 2·B·d·V +
    2·I·V·9B`` (both normalisers)."""
    i, d, v, b = shape.intermediate, shape.hidden, shape.vocab, prompts
    return n_layers * (2 * i * d * v + 2 * b * d * v + 2 * i * v * 9 * b)


def report(shape: ModelShape, peaks: dict[int, float], threads: int, results: list[PassResult],
           quick: bool) -> str:
    peak = peaks[threads]
    lines = [
        f"## Achieved FLOP/s of the main passes on `{shape.name}` (`benchmarks/bench_flops.py`)",
        "",
        f"`{shape.name}`: {shape.n_layers} layers, d = {shape.hidden}, I = {shape.intermediate}, V = {shape.vocab:,}, "
        f"{shape.n_heads} heads × {shape.head_dim} (d_attn = {shape.d_attn}, {shape.n_kv_heads} KV heads); "
        f"N_lin = {shape.linear / 1e6:.1f} M weights in the decoder layers' Linear modules, unembedding d·V = "
        f"{shape.unembedding / 1e6:.1f} M ({'tied to' if shape.tied else 'apart from'} the embedding), "
        f"{shape.parameters / 1e6:.1f} M parameters in all. Per token of a 257-token window: "
        f"2·N_lin + 2·d·V + 2·n_layers·seq·d_attn = {shape.flops_per_token(257) / 1e6:.0f} MFLOP "
        f"({2 * shape.unembedding / shape.flops_per_token(257):.0%} of it the unembedding).",
        "",
        "Peak: best of 10 `torch.matmul` of 2048 × 2048 float32 = "
        + ", ".join(f"**{p / 1e9:.0f} GFLOP/s** at {t} thread{'s' if t > 1 else ''}" for t, p in sorted(peaks.items()))
        + f". The passes ran at {threads} threads, one after another in one process"
        + (" (quick settings)." if quick else " with the audit's full settings."),
        "",
        "| pass | settings | seconds | tokens through the stack | GFLOP (forward) | GFLOP (CNA logit work) "
        "| GFLOP/s | of peak | load (1/5/15 min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        rate = r.flops / r.seconds
        lines.append(f"| {r.name} | {r.settings} | {r.seconds:.1f} | {r.work['token_equivalents']:,.0f} | "
                     f"{r.forward_flops / 1e9:,.1f} | {r.extra_flops / 1e9:,.1f} | {rate / 1e9:.1f} | "
                     f"**{rate / peak:.0%}** | {r.load} |")
    lines += ["", "Where the time goes (a separate profiled run; seconds of root torch operators, children "
              "included, and the rest of the wall time outside torch operators):", "",
              "| pass | profiled wall (s) | " + " | ".join(CATEGORIES) + " | elementwise and reductions | "
              "outside torch ops (Python, hooks) |", "|---|---:|" + "---:|" * (len(CATEGORIES) + 2)]
    for r in results:
        assert r.profile is not None
        wall, secs = r.profile["wall"], r.profile["seconds"]
        other = sum(v for k, v in secs.items() if k not in CATEGORIES)
        cells = [f"{secs.get(c, 0.0) / wall:.0%}" for c in CATEGORIES] + [f"{other / wall:.0%}",
                                                                          f"{r.profile['outside'] / wall:.0%}"]
        lines.append(f"| {r.name} | {wall:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Heaviest root operators per pass: " + "; ".join(
        f"{r.name}: " + ", ".join(f"{n.removeprefix('aten::')} {s:.1f} s" for n, s in r.profile["top"][:5])
        for r in results if r.profile) + "."]
    cna = next((r for r in results if r.name == "CNA scoring"), None)
    if cna is not None:
        formula = cna_formula(shape, cna.work["cna_layers"], cna.work["cna_prompts"])
        lines += ["", f"CNA's logit work counted by FlopCounterMode: {cna.extra_flops / 1e9:,.1f} GFLOP; the formula "
                  f"n_layers·(2·I·d·V + 2·B·d·V + 2·I·V·9B) with B = {cna.work['cna_prompts']} prompts and "
                  f"{cna.work['cna_layers']} layers gives {formula / 1e9:,.1f} GFLOP."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    threads = torch.get_num_threads()
    peaks = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        peaks[n] = matmul_peak()
    torch.set_num_threads(threads)
    loaded = load_model(args.model)
    shape = ModelShape.of(loaded)
    results = main_passes(loaded, shape, quick=args.quick, repeats=args.repeats)
    text = report(shape, peaks, threads, results, args.quick)
    print(text)
    OUT.mkdir(exist_ok=True)
    stem = f"flops_{loaded.spec.replace('/', '_')}"
    (OUT / f"{stem}.md").write_text(text)
    (OUT / f"{stem}.json").write_text(json.dumps({
        "shape": asdict(shape), "peaks": peaks, "threads": threads, "quick": args.quick,
        "passes": [{**asdict(r), "flops": r.flops} for r in results]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
