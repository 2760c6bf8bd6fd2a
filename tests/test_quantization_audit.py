"""The registered quantization checks end to end: tiny planted model through AuditContext, the report's table
and chart, the CLI; and one slow test on the real default model (what is discovered, not hard-coded)."""

from __future__ import annotations

import math

import pytest
import torch

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.corpora import load_corpus
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.registry import get_check
from lmaudit.checks.quantization.checks import (
    BlockSizeSweep,
    QuantEvalParams,
    RecoveryParams,
    SweepParams,
    SweepPoint,
    TableParams,
    _calibration,
    _windows,
    build_scheme,
    evaluate_scheme,
    quantization_block_sweep,
    quantization_recovery,
    quantization_table,
    spearman,
    super_outliers,
)
from lmaudit.checks.quantization.schemes import evaluate_quantized
from lmaudit.reports.charts import render_charts
from lmaudit.reports.html import render_html
from lmaudit.reports.records import AuditRecord, RunInfo, to_jsonable
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


TOKENIZER = byte_tokenizer()
SMALL = {"seq_len": 32, "n_windows": 2, "calibration_windows": 1, "z_candidates": (math.inf, 3.0)}


def planted_context(corpus_dir=None) -> AuditContext:
    """Tiny Llama with a detectable super weight at W_down[1][5, 17]: neuron 17's up/gate rows point along the
    BOS token's MLP input (so x[BOS, 17] is huge) and W_down[:, 17] is zero except 8.0 at row 5."""
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    modules = adapter.layer(1)
    with capture({"up": modules.up_proj}, what="input") as seen, torch.no_grad():
        model(input_ids=torch.tensor([[TOKENIZER.bos_token_id]]))
    h = seen.input("up")[0, 0]
    with torch.no_grad():
        for module in (modules.up_proj, modules.gate_proj):
            adapter.weight(module)[17] = 10.0 * h / h.norm()
        w_down = adapter.down_proj_weight(1)
        w_down[:, 17] = 0.0
        w_down[5, 17] = 8.0
    loaded = LoadedModel(spec="tiny-planted", source="memory", kind="memory", model=model, tokenizer=TOKENIZER,
                         dtype="float32", content_hash="tiny", load_seconds=0.0)
    if corpus_dir is None:
        return AuditContext(model=loaded)
    return AuditContext(model=loaded, corpus_spec=str(corpus_dir / "alpha.txt"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Two short text corpora (byte-tokenizing pydoc or WikiText-2 would dominate these tests' time)."""
    directory = tmp_path_factory.mktemp("corpora")
    (directory / "alpha.txt").write_text("The quick brown fox jumps over the lazy dog. " * 12)
    (directory / "beta.txt").write_text("def f(x):\n    return x * 2  # doubles\n" * 14)
    return directory


@pytest.fixture(scope="module")
def context(corpus_dir) -> AuditContext:
    return planted_context(corpus_dir)


@pytest.fixture(scope="module")
def small(corpus_dir) -> dict:
    names = tuple(str(corpus_dir / n) for n in ("alpha.txt", "beta.txt", "missing.txt"))
    return {**SMALL, "corpora": names}


def test_checks_are_registered():
    for name in ("quantization_recovery", "quantization_table", "quantization_block_sweep"):
        assert get_check(name).area == "quantization"


def test_table_rows_follow_the_recovery_formula_and_share_evaluations(context, small):
    before = {k: v.clone() for k, v in context.model.model.state_dict().items()}
    table = quantization_table(context, TableParams(block_size=256, **small))
    assert table.super_weights == ((1, 5, 17),)  # from the detector, through context.memo
    missing = small["corpora"][2]
    alpha, beta = "alpha", "beta"  # a text file's corpus name is its stem
    assert [r.corpus for r in table.rows] == [alpha, beta] * 3 and table.missing_corpora == (missing,)
    assert [e.scheme for e in table.schemes] == ["W8A8 per-token", "W8A8 per-tensor", "W4 block 16²"]
    for r in table.rows:
        damage = r.ppl_naive - r.ppl_fp
        expected = (r.ppl_naive - r.ppl_aware) / damage if damage > 0 else math.nan
        assert r.recovery == pytest.approx(expected, nan_ok=True)
        assert r.ppl_ratio == pytest.approx(r.ppl_aware / r.ppl_fp)
        held = (r.ppl_naive - r.ppl_hold_out) / damage if damage > 0 else math.nan
        assert r.hold_out_recovery == pytest.approx(held, nan_ok=True)
    for e in table.schemes[:2]:  # W8A8 does not clip: hold-out only is the aware scheme itself
        assert all(r.ppl_hold_out == r.ppl_aware for r in e.rows)
    fp = {r.corpus: r.ppl_fp for r in table.rows}
    assert all(r.ppl_fp == fp[r.corpus] for r in table.rows)  # one full-precision figure per corpus
    # the per-scheme gate reuses the table's evaluation (same object), and the sweep reuses it for pydoc
    gate = quantization_recovery(context, RecoveryParams(scheme="w4-block", block_size=256, **small))
    assert gate.evaluation is table.schemes[2]
    w4 = table.schemes[2]
    assert w4.clip is not None and w4.clip.z in (math.inf, 3.0)
    assert w4.clip.calibration_tokens == 1 * 32  # SMALL: one calibration window of 32 tokens
    # hold-out only = the aware scheme without clipping, on the same windows
    adapter = context.model.adapter
    windows = {r.corpus: _windows(context, TableParams(block_size=256, **small), load_corpus(c))
               for r, c in zip(w4.rows, small["corpora"][:2], strict=True)}
    hold = evaluate_quantized(adapter, build_scheme("w4-block", block_size=256), windows,
                              outliers=super_outliers(context), batch_size=1)
    assert [r.ppl_hold_out for r in w4.rows] == [hold.perplexity[r.corpus] for r in w4.rows]
    if w4.clip.z == math.inf:
        assert all(r.ppl_hold_out == r.ppl_aware for r in w4.rows)
    sweep = quantization_block_sweep(context, SweepParams(block_sizes=(64, 256),
                                                          **{**small, "corpora": small["corpora"][:1]}))
    assert [(p.block_size, p.corpus) for p in sweep.points] == [(64, alpha), (256, alpha)]
    reused = next(r for r in w4.rows if r.corpus == alpha)
    assert sweep.points[1].ppl_naive == reused.ppl_naive and sweep.points[1].ppl_aware == reused.ppl_aware
    metrics = gate.metrics()
    assert metrics["n_super_weights"] == 1 and metrics["peak_memory_ratio"] >= 1.0
    for key, value in before.items():
        assert torch.equal(context.model.model.state_dict()[key], value), f"{key} changed"


def test_calibration_windows_follow_the_evaluation_windows(context, small):
    """The z-search slice is the `calibration_windows` windows right after the evaluation windows of the session
    corpus: contiguous with them in the token stream and sharing no window with them."""
    params = QuantEvalParams(**{**small, "calibration_windows": 3})
    corpus = context.corpus()
    evaluation = _windows(context, params, corpus)
    calibration = _calibration(context, params)
    assert calibration.shape == (3, evaluation.shape[1])
    from lmaudit.checks.core.perplexity import corpus_windows

    both = corpus_windows(context.model.tokenizer, corpus, params.seq_len, params.n_windows + 3)
    assert torch.equal(both[: params.n_windows], evaluation) and torch.equal(both[params.n_windows :], calibration)
    assert QuantEvalParams().calibration_windows >= 2  # the default is more than the single noisy window


def test_spearman_known_answers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1e9]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)  # one adjacent swap: 1 − 6·2/120
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(0.9486832980505138)  # a tie: average ranks
    assert math.isnan(spearman([1, 2], [1, 2]))  # fewer than 3 points
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))  # constant
    assert math.isnan(spearman([1, 2, 3], [1, math.nan, 2]))
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_sweep_metrics_gate_the_trend():
    def sweep(aware, naive=None, blocks=(32, 256, 4096, 16384, 65536)):
        naive = naive or aware
        return BlockSizeSweep(tuple(SweepPoint(4, b, "c", 10.0, n, a, math.nan, math.inf, a)
                                    for b, a, n in zip(blocks, aware, naive, strict=True)), ())

    grows = sweep([10.0, 18.0, 40.0, 700.0, 3e4]).metrics()
    assert grows["aware_spearman"] == grows["naive_spearman"] == pytest.approx(1.0)
    assert grows["smallest_block_ppl_ratio"] == 1.0 and grows["aware_growth"] == pytest.approx(3e3)
    swapped = sweep([10.0, 40.0, 18.0, 700.0, 3e4]).metrics()
    assert swapped["aware_spearman"] == pytest.approx(0.9)
    flat = sweep([20.0] * 5).metrics()  # e.g. a quantizer that ignores the block size
    assert math.isnan(flat["aware_spearman"]) and flat["aware_growth"] == 1.0
    # points in any order, several series: the worst series counts
    two = BlockSizeSweep(sweep([30.0, 20.0, 10.0], blocks=(3, 2, 1)).points
                         + tuple(SweepPoint(3, b, "c", 10.0, p, p, 0.0, 8.0, p) for b, p in ((1, 12.0), (2, 11.0), (3, 50.0))),
                         ())
    m = two.metrics()
    assert m["aware_spearman"] == pytest.approx(0.5) and m["smallest_block_ppl_ratio"] == pytest.approx(1.2)
    assert m["aware_growth"] == pytest.approx(3.0) and m["n_points"] == 6


def test_report_renders_the_table_and_the_chart(context, small):
    alpha = "alpha"
    sweep = quantization_block_sweep(context, SweepParams(block_sizes=(64, 256),
                                                          **{**small, "corpora": small["corpora"][:1]}))
    table = quantization_table(context, TableParams(block_size=256, **small))
    charts = render_charts("BlockSizeSweep", to_jsonable(sweep))
    assert len(charts) == 1 and charts[0].error == "" and "<svg" in str(charts[0].svg)
    records = [
        AuditRecord(nodeid=f"audits/q.yaml::{name}", name=name, source="audits/q.yaml", status="passed",
                    check=check, area="quantization", result=to_jsonable(result), result_type=type(result).__name__)
        for name, check, result in (("table", "quantization_table", table),
                                    ("sweep", "quantization_block_sweep", sweep))
    ]
    html = render_html(records, RunInfo())
    assert "section template" not in html and "chart failed" not in html
    assert "full precision PPL" in html and "W8A8 per-tensor" in html and "L1[5, 17]" in html
    assert f"Perplexity vs block size on {alpha}" in html


def test_cli_prints_the_table(context, small, monkeypatch, capsys):
    import lmaudit.checks.cli.quantize as command
    import lmaudit.checks.core.loading

    monkeypatch.setattr(lmaudit.checks.core.loading, "load_model", lambda *a, **k: context.model)
    from lmaudit.checks.cli.main import main

    corpus = ["--corpus", small["corpora"][0], "--corpus", small["corpora"][1]]
    assert main(["quantize", "--scheme", "w8a8", "--n-windows", "1", "--seq-len", "32", *corpus]) == 0
    out = capsys.readouterr().out
    assert "W8A8 per-token" in out and "W8A8 per-tensor" in out and "recovery" in out and "L1[5, 17]" in out
    assert "alpha" in out and "beta" in out
    assert main(["quantize", "--scheme", "w4-block", "--block", "0"]) == 2
    assert command.SCHEMES == ("w8a8", "w4-block")


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_model_aware_w8a8_per_tensor_recovers_what_naive_loses():
    """On the default model, per-tensor W8A8 hurts and holding the detected super outliers out recovers part of
    it (measured: 18 % on this window, 10-26 % on 4 windows; other massive activations of the last layers,
    which are not super activations, keep the rest of the damage)."""
    from lmaudit.checks.core.loading import load_model

    context = AuditContext(model=load_model("smollm2-135m-instruct"))
    params = QuantEvalParams(n_windows=1, corpora=("pydoc",))
    e = evaluate_scheme(context, params, build_scheme("w8a8-per-tensor"))
    assert len(e.super_weights) >= 1
    row = e.rows[0]
    assert row.naive_ppl_ratio > 1.3  # naive per-tensor activations really hurt
    assert row.ppl_naive > row.ppl_aware > 0.5 * row.ppl_fp
    assert row.recovery > 0.05
    assert e.aware_memory.peak_ratio < 2.5
