"""The registered quantization checks end to end on a tiny *trained* model with a planted super weight: the
formulas of the rows, the sharing of evaluations between checks, the calibration windows, the premises, the
report's table and chart, the CLI; and one slow test on the real default model.

The planted model (:func:`planted_model`) is a tiny Llama trained for a few hundred steps on the two test corpora
with a super weight held fixed during training, so that quantization damage is real (a random model predicts
uniformly and quantization cannot hurt it) and the super weight is what the naive schemes trip over:

* hidden dimension ``MARK_DIM`` is a BOS marker: the embedding writes ``MARK`` there for BOS and 0 for every other
  token, and no attention or MLP output writes it (their rows ``MARK_DIM`` are held at 0);
* neuron ``COL`` of layer ``LAYER`` reads only the marker (its up and gate rows are ``GAIN·e_MARK_DIM``), so its
  activation ``x[BOS, COL]`` is massive (≈ 130, the others ≈ 0.05) and exactly 0 on every other token;
* ``W_down[LAYER][:, COL]`` is ``SUPER`` at row ``ROW`` and 0 elsewhere: the super weight (the trained weights of
  that matrix are ≈ 0.05), which writes the super activation ``y[BOS, ROW]`` ≈ 5000.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.outliers import SuperActivation, SuperWeightSites
from lmaudit.checks.core.perplexity import corpus_windows
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import get_check
from lmaudit.checks.quantization.checks import (
    QuantEvalParams,
    RecoveryParams,
    SweepParams,
    TableParams,
    build_scheme,
    evaluate_scheme,
    quantization_block_sweep,
    quantization_recovery,
    quantization_table,
)
from lmaudit.checks.quantization.evaluate import calibration_windows
from lmaudit.checks.quantization.schemes import SuperOutliers, evaluate_quantized
from lmaudit.reports.charts import render_charts
from lmaudit.reports.html import render_html
from lmaudit.reports.records import AuditRecord, RunInfo, to_jsonable
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
T = TypeVar("T")

TOKENIZER = byte_tokenizer()
TEXTS = {"alpha.txt": "The quick brown fox jumps over the lazy dog. " * 12,
         "beta.txt": "def f(x):\n    return x * 2  # doubles\n" * 14}
LAYER, ROW, COL = 1, 5, 17  # the planted super weight W_down[LAYER][ROW, COL]
MARK_DIM, MARK, GAIN, SUPER = 0, 20.0, 2.0, 40.0
TRAIN_STEPS = 200
# 2 windows × 32 tokens per corpus, 1 calibration window; z = 3 is a mild clip on blocks this small
SMALL = {"seq_len": 32, "n_windows": 2, "calibration_windows": 1, "z_candidates": (math.inf, 3.0)}
BLOCK = 1024  # the tiny model's "large block": W_down is 32 × 64 = 2048 elements, attention 32 × 32


def _fixed(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Plant the marker, the neuron and the super weight; return (parameter, mask) of what training must not move."""
    from lmaudit.checks.core.adapter import ArchitectureAdapter

    adapter = ArchitectureAdapter(model)
    fixed = []

    def hold(weight: torch.Tensor, index: tuple) -> None:
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[index] = True
        fixed.append((weight, mask))

    bos = TOKENIZER.bos_token_id
    embedding = model.get_input_embeddings().weight
    embedding[:, MARK_DIM] = 0.0
    embedding[bos, MARK_DIM] = MARK
    hold(embedding, (slice(None), MARK_DIM))
    for i in range(adapter.n_layers):  # nothing writes the marker dimension
        for module in (adapter.attn_out(i), adapter.down_proj(i)):
            adapter.weight(module)[MARK_DIM] = 0.0
            hold(adapter.weight(module), (MARK_DIM,))
    modules = adapter.layer(LAYER)
    for module in (modules.up_proj, modules.gate_proj):
        adapter.weight(module)[COL] = 0.0
        adapter.weight(module)[COL, MARK_DIM] = GAIN
        hold(adapter.weight(module), (COL,))
    w_down = adapter.down_proj_weight(LAYER)
    w_down[:, COL] = 0.0
    w_down[ROW, COL] = SUPER
    hold(w_down, (slice(None), COL))
    hold(modules.norms["post_attention_layernorm"].weight, (MARK_DIM,))
    return fixed


@functools.cache
def planted_model() -> LoadedModel:
    """The trained planted model (module docstring), built once per test session (≈ 2 s on one thread)."""
    model = tiny_model("llama")
    with torch.no_grad():
        fixed = _fixed(model)
    handles = [weight.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0.0)) for weight, mask in fixed]
    ids = torch.tensor(TOKENIZER("".join(TEXTS.values()), add_special_tokens=False)["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # no weight decay: held entries never move
    model.train()
    try:
        for _ in range(TRAIN_STEPS):
            starts = torch.randint(0, len(ids) - 32, (8,), generator=generator).tolist()
            batch = torch.stack([ids[s : s + 32] for s in starts])  # (8, 32)
            batch = torch.cat([torch.full((8, 1), TOKENIZER.bos_token_id), batch], dim=1)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return LoadedModel.from_model(model, TOKENIZER, spec="tiny-planted")


PLANTED_SITES = SuperWeightSites(((LAYER, ROW, COL),), (SuperActivation(LAYER, 0, ROW, 5000.0),), "planted")


@dataclass
class SitesContext(AuditContext):
    """An audit context whose super-weight sites are given, standing in for the super-weight area's detection
    (what ``context.require(SuperWeightSites)`` returns)."""

    sites: SuperWeightSites = PLANTED_SITES

    def require(self, kind: type[T]) -> T:
        return self.sites if kind is SuperWeightSites else super().require(kind)  # type: ignore[return-value]


def audit_context(corpus_dir: Path, sites: SuperWeightSites = PLANTED_SITES,
                  model: LoadedModel | None = None) -> AuditContext:
    """A fresh context on the planted model (by default) whose session corpus is ``alpha`` and whose super
    weights are ``sites``."""
    return SitesContext(model=model or planted_model(), corpus_spec=str(corpus_dir / "alpha.txt"), sites=sites)


def write_corpora(directory: Path) -> Path:
    """The two short corpora the planted model was trained on (byte-tokenizing pydoc would dominate the time)."""
    for name, text in TEXTS.items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpora(tmp_path_factory.mktemp("quant-corpora"))


@pytest.fixture(scope="module")
def small(corpus_dir) -> dict:
    names = tuple(str(corpus_dir / n) for n in ("alpha.txt", "beta.txt", "missing.txt"))
    return {**SMALL, "corpora": names}


def rows_by_identity(*evaluations) -> set[int]:
    return {id(row) for e in evaluations for row in e.rows}


# ------------------------------------------------------------------------------------------------ registration


def test_checks_are_registered_with_their_metrics_declared_on_the_result_class():
    import lmaudit.checks.quantization.results as results
    from lmaudit.checks.core.results import metric_group

    for name, gates in (("quantization_recovery", ("recovery", "hold_out_recovery")),
                        ("quantization_table", ("min_recovery", "min_hold_out_recovery")),
                        ("quantization_block_sweep", ("naive_spearman", "growth_recovery"))):
        spec = get_check(name)
        assert spec.area == "quantization" and set(gates) <= set(spec.metrics)
        assert "weights_on_grid" in spec.metrics
        assert not any(isinstance(v, metric_group) for v in vars(spec.result).values())  # declared one by one
    assert {"quick", "quick_block_sizes"}.isdisjoint(RecoveryParams.model_fields | SweepParams.model_fields)
    assert results.QuantizationRecovery.metric_names().count("recovery") == 1


# ------------------------------------------------------------------------------------------------ evaluation


def test_table_rows_follow_the_formulas_and_the_checks_share_one_evaluation(corpus_dir, small):
    context = audit_context(corpus_dir)
    model = context.model.model
    before = snapshot(model)
    table = quantization_table(context, TableParams(block_size=BLOCK, **small))
    assert table.super_weights == ((LAYER, ROW, COL),)
    assert [r.corpus for r in table.rows] == ["alpha", "beta"] * 3  # a text file's corpus is named by its stem
    assert table.missing_corpora == (small["corpora"][2],)
    assert [e.scheme for e in table.schemes] == ["W8A8 per-token", "W8A8 per-tensor", "W4 block 32²"]
    for r in table.rows:
        assert r.damaged  # the planted model is hurt by every naive scheme
        assert r.recovery == pytest.approx((r.ppl_naive - r.ppl_aware) / (r.ppl_naive - r.ppl_fp))
        assert r.hold_out_recovery == pytest.approx((r.ppl_naive - r.ppl_hold_out) / (r.ppl_naive - r.ppl_fp))
        assert r.ppl_ratio == pytest.approx(r.ppl_aware / r.ppl_fp)
        assert r.naive_ppl_ratio == pytest.approx(r.ppl_naive / r.ppl_fp)
    for e in table.schemes[:2]:  # W8A8 does not clip: the hold-out is the paper's method itself
        assert e.clip is None and all(r.ppl_hold_out == r.ppl_aware for r in e.rows)
    fp = {r.corpus: r.ppl_fp for r in table.rows}
    assert all(r.ppl_fp == fp[r.corpus] for r in table.rows)  # one full-precision figure per corpus
    # the per-scheme gate and the sweep reuse the table's rows (the very objects), not a re-evaluation
    gate = quantization_recovery(context, RecoveryParams(scheme="w4-block", block_size=BLOCK, **small))
    assert rows_by_identity(gate.evaluation) == rows_by_identity(table.schemes[2])
    sweep = quantization_block_sweep(context, SweepParams(block_sizes=(256, BLOCK),
                                                          **{**small, "corpora": small["corpora"][:1]}))
    assert [(p.block_size, p.corpus) for p in sweep.points] == [(256, "alpha"), (BLOCK, "alpha")]
    alpha = table.schemes[2].rows[0]
    assert (sweep.points[1].ppl_naive, sweep.points[1].ppl_aware) == (alpha.ppl_naive, alpha.ppl_aware)
    metrics = gate.metrics()
    assert metrics["n_super_weights"] == 1 and metrics["peak_memory_ratio"] >= 1.0
    assert metrics["weights_on_grid"] is False and metrics["corpora"] == ["alpha", "beta"]
    assert_unchanged(model, before)


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


def test_hold_out_only_is_the_aware_scheme_without_clipping(corpus_dir, small):
    context = audit_context(corpus_dir)
    params = RecoveryParams(scheme="w4-block", block_size=BLOCK, **small)
    evaluation = evaluate_scheme(context, params, build_scheme("w4-block", block_size=BLOCK))
    assert evaluation.clip is not None and math.isfinite(evaluation.clip.z)  # the planted model wants clipping
    model = context.model
    windows = {c.name: corpus_windows(model.tokenizer, c, params.seq_len, params.n_windows)
               for c in map(context.corpus, small["corpora"][:2])}
    outliers = SuperOutliers.from_sites(PLANTED_SITES)
    scheme = build_scheme("w4-block", block_size=BLOCK)
    hold = evaluate_quantized(model.adapter, scheme, windows, outliers=outliers, batch_size=1)
    aware = evaluate_quantized(model.adapter, scheme, windows, outliers=outliers, clip_z=evaluation.clip.z,
                               batch_size=1)
    assert [r.ppl_hold_out for r in evaluation.rows] == [hold.perplexity[r.corpus] for r in evaluation.rows]
    assert [r.ppl_aware for r in evaluation.rows] == [aware.perplexity[r.corpus] for r in evaluation.rows]


def test_clip_threshold_is_chosen_on_windows_disjoint_from_every_evaluated_window(corpus_dir, small, monkeypatch):
    """The z search sees only the calibration windows: windows spread over the second half of the session corpus,
    the same for every number of evaluation windows, sharing no window with any evaluated one."""
    import lmaudit.checks.quantization.evaluate as science

    seen: dict[str, list[torch.Tensor]] = {"calibration": [], "evaluation": []}
    search, evaluate = science.search_clip_z, science.evaluate_quantized

    def spy_search(adapter, scheme, outliers, calibration, **kwargs):
        seen["calibration"].append(calibration.clone())
        return search(adapter, scheme, outliers, calibration, **kwargs)

    def spy_evaluate(adapter, scheme, windows, **kwargs):
        seen["evaluation"].extend(w.clone() for w in windows.values())
        return evaluate(adapter, scheme, windows, **kwargs)

    monkeypatch.setattr(science, "search_clip_z", spy_search)
    monkeypatch.setattr(science, "evaluate_quantized", spy_evaluate)
    params = RecoveryParams(scheme="w4-block", block_size=BLOCK, **{**small, "calibration_windows": 3})
    quantization_recovery(audit_context(corpus_dir), params)
    (calibration,) = seen["calibration"]
    corpus = load_corpus_file(corpus_dir / "alpha.txt")
    every = corpus_windows(TOKENIZER, corpus, params.seq_len, len(TEXTS["alpha.txt"]) // params.seq_len)
    assert len(every) == 16  # the byte tokenizer: one token per character
    assert torch.equal(every[[9, 12, 14]], calibration)  # the middles of 3 equal parts of windows 8-15
    assert torch.equal(every[: params.n_windows], seen["evaluation"][0])  # alpha's evaluation windows come first
    evaluated = {tuple(row.tolist()) for w in seen["evaluation"] for row in w}
    assert evaluated and evaluated.isdisjoint(tuple(row.tolist()) for row in calibration)
    more = params.settings().__class__(**{**vars(params.settings()), "n_windows": 5})
    assert torch.equal(calibration_windows(planted_model(), corpus, more), calibration)  # any profile: same slice
    assert QuantEvalParams().calibration_windows >= 2  # the default is more than the single noisy window


def test_a_corpus_too_short_for_evaluation_and_calibration_is_an_error(corpus_dir, small):
    from lmaudit.checks.core.perplexity import CorpusTooShortError

    params = RecoveryParams(scheme="w4-block", block_size=BLOCK, **{**small, "n_windows": 9})  # alpha: 16 windows
    with pytest.raises(CorpusTooShortError, match="the 9 evaluation windows must fit in its first half"):
        quantization_recovery(audit_context(corpus_dir), params)


def load_corpus_file(path: Path):
    from lmaudit.checks.core.corpora import load_corpus

    return load_corpus(str(path))


# ------------------------------------------------------------------------------------------------ premises


def test_without_a_confirmed_super_weight_the_entries_are_skipped_with_the_reason(corpus_dir, small):
    context = audit_context(corpus_dir, sites=SuperWeightSites((), (), "data-free detection on 'Hello'"))
    for check, params in ((quantization_recovery, RecoveryParams(**small)), (quantization_table, TableParams(**small)),
                          (quantization_block_sweep, SweepParams(**small))):
        with pytest.raises(PremiseMissing, match=r"no super weight was confirmed.*detection on 'Hello'"):
            check(context, params)


def on_4bit_grid(model: LoadedModel):
    """Intervention: every decoder weight on the 4-bit min-max grid of its 32-element blocks, as a model
    dequantized from GGUF Q4_1 is."""
    from lmaudit.checks.core.interventions import transform_weights
    from lmaudit.checks.quantization.quantizers import Granularity, QuantSpec, Scheme, fake_quantize

    spec = QuantSpec(4, Scheme.ASYMMETRIC, Granularity.BLOCKWISE, 32)
    return transform_weights(model.adapter.decoder_linears(), lambda w, out: fake_quantize(w, spec, out=out))


def test_a_model_already_on_the_4bit_grid_is_found_and_its_own_block_is_no_damage(corpus_dir, small):
    from lmaudit.checks.quantization.grid import detect_weight_grid

    model = planted_model()
    float_grid = detect_weight_grid(model.adapter)
    assert not float_grid.on_grid  # trained float weights (the planted zero rows are the few constant blocks)
    with on_4bit_grid(model):
        grid = detect_weight_grid(model.adapter)
        assert grid.on_grid and grid.share_on_grid == 1.0 and grid.rtn_exact_share == 1.0
        assert "already quantized" in grid.finding and grid.block_size == 32 and grid.bits == 4
        context = audit_context(corpus_dir)
        with pytest.raises(PremiseMissing, match="naive W4 block 32 does no damage"):
            quantization_recovery(context, RecoveryParams(scheme="w4-block", block_size=32, **small))
        sweep = quantization_block_sweep(context, SweepParams(block_sizes=(32, 256, BLOCK), **small))
    assert sweep.weights_on_grid and sweep.metrics()["weights_on_grid"] is True
    for p in sweep.points:
        assert p.on_model_grid == (p.block_size == 32)
        if p.on_model_grid:  # the model's own grid: naive RTN reproduces it, nothing to recover
            assert p.ppl_naive == p.ppl_fp and math.isnan(p.recovery)
    assert detect_weight_grid(model.adapter) == float_grid  # restored


# ------------------------------------------------------------------------------------------------ sweep metrics


def test_sweep_metrics_on_known_series():
    from lmaudit.checks.quantization.grid import WeightGrid
    from lmaudit.checks.quantization.results import BlockSizeSweep, SweepPoint

    grid = WeightGrid.of(32, 4, 0.0, 0.0, 1, 1)

    def sweep(naive, aware, blocks=(32, 256, 4096, 16384), bits=4):
        return tuple(SweepPoint(bits, b, "c", 10.0, n, a, a, (n - a) / (n - 10.0) if n > 10 else math.nan,
                                math.inf, False) for b, n, a in zip(blocks, naive, aware, strict=True))

    grows = BlockSizeSweep(sweep([10.0, 20.0, 40.0, 1000.0], [10.0, 12.0, 15.0, 100.0]), (), grid).metrics()
    assert grows["naive_spearman"] == pytest.approx(1.0) and grows["aware_spearman"] == pytest.approx(1.0)
    assert grows["growth_recovery"] == pytest.approx(1 - math.log(10) / math.log(100))  # 0.5
    same = BlockSizeSweep(sweep([10.0, 20.0, 40.0, 1000.0], [10.0, 20.0, 40.0, 1000.0]), (), grid).metrics()
    assert same["growth_recovery"] == 0.0  # an aware scheme that changes nothing avoids nothing
    swapped = BlockSizeSweep(sweep([10.0, 40.0, 20.0, 1000.0], [10.0] * 4), (), grid).metrics()
    assert swapped["naive_spearman"] == pytest.approx(0.8) and swapped["growth_recovery"] == 1.0
    flat = BlockSizeSweep(sweep([10.0] * 4, [10.0] * 4), (), grid).metrics()  # e.g. weights every B reproduces
    assert math.isnan(flat["naive_spearman"]) and math.isnan(flat["growth_recovery"])
    # points in any order and several series: the worst series counts
    two = BlockSizeSweep(sweep([10.0, 20.0, 40.0, 1000.0], [10.0] * 4)[::-1]
                         + sweep([11.0, 30.0, 20.0, 50.0], [11.0, 30.0, 20.0, 50.0], bits=3), (), grid).metrics()
    assert two["naive_spearman"] == pytest.approx(0.8) and two["growth_recovery"] == 0.0 and two["n_points"] == 8


# ------------------------------------------------------------------------------------------------ report, CLI


def test_report_renders_the_table_the_gate_the_sweep_and_the_grid_finding(corpus_dir, small):
    context = audit_context(corpus_dir)
    sweep = quantization_block_sweep(context, SweepParams(block_sizes=(256, BLOCK),
                                                          **{**small, "corpora": small["corpora"][:1]}))
    table = quantization_table(context, TableParams(block_size=BLOCK, **small))
    gate = quantization_recovery(context, RecoveryParams(scheme="w4-block", block_size=BLOCK, **small))
    charts = render_charts("BlockSizeSweep", to_jsonable(sweep))
    assert len(charts) == 1 and charts[0].error == "" and "<svg" in str(charts[0].svg)
    records = [
        AuditRecord(nodeid=f"audits/q.yaml::{name}", name=name, source="audits/q.yaml", status="passed",
                    check=check, area="quantization", result=to_jsonable(result), result_type=type(result).__name__)
        for name, check, result in (("table", "quantization_table", table), ("gate", "quantization_recovery", gate),
                                    ("sweep", "quantization_block_sweep", sweep))
    ]
    html = render_html(records, RunInfo())
    assert "section template" not in html and "chart failed" not in html
    assert "full precision PPL" in html and "W8A8 per-tensor" in html and f"L{LAYER}[{ROW}, {COL}]" in html
    assert "Perplexity vs block size on alpha" in html and "hold-out recovery" in html
    assert "not on a 4-bit grid" in html  # the grid finding is shown
    assert "Clipping threshold z" in html and "calibration" in html


def test_cli_prints_the_table(corpus_dir, small, monkeypatch, capsys):
    import lmaudit.checks.core.loading
    import lmaudit.checks.harness.context

    monkeypatch.setattr(lmaudit.checks.core.loading, "load_model", lambda *a, **k: planted_model())
    monkeypatch.setattr(lmaudit.checks.harness.context, "AuditContext", SitesContext)  # the detection stand-in
    from lmaudit.checks.cli.main import main

    corpora = ["--corpora", *small["corpora"][:2]]  # the evaluated corpora (--corpus is the session's: calibration)
    assert main(["quantize", "--scheme", "w8a8", "--n-windows", "1", "--seq-len", "32", *corpora]) == 0
    out = capsys.readouterr().out
    assert "W8A8 per-token" in out and "W8A8 per-tensor" in out and "recovery" in out
    assert f"L{LAYER}[{ROW}, {COL}]" in out and "alpha" in out and "beta" in out
    assert main(["quantize", "--scheme", "w4-block", "--block", "0"]) == 2


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_model_is_found_on_its_gguf_grid_and_per_tensor_w8a8_recovers():
    """The default model was dequantized from GGUF Q4_1: the grid detection must say so from the weights alone;
    and per-tensor W8A8 hurts it, holding the detected super outliers out recovers part of that (one window)."""
    from lmaudit.checks.core.loading import load_model
    from lmaudit.checks.quantization.grid import detect_weight_grid

    load_checks()
    loaded = load_model("smollm2-135m-instruct")
    grid = detect_weight_grid(loaded.adapter)
    assert grid.on_grid and grid.rtn_exact_share == 1.0
    context = AuditContext(model=loaded)
    params = QuantEvalParams(n_windows=1, corpora=("pydoc",))
    e = evaluate_scheme(context, params, build_scheme("w8a8-per-tensor"))
    assert len(e.super_weights) >= 1
    row = e.rows[0]
    assert row.naive_ppl_ratio > 1.3 and row.ppl_naive > row.ppl_aware and row.recovery > 0.05
    assert e.aware_memory.peak_ratio < 2.5
