"""Every ``lmaudit`` command end to end, in process, on saved tiny checkpoints: the registered checks run through the
catalog (a planted super weight is found, the planted arithmetic heads are confirmed), ``--json`` is one strict
JSON document on stdout in the audits' record shape, a missing premise is one line and exit 2 after whatever did
run, and ``lmaudit checks`` lists exactly the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.cli.main import main
from tests.checkpoints import byte_tokenizer, save_tiny_llama
from tests.test_superweights import plant_super_weight

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS_TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times." for i in range(400))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny checkpoints: ``base`` (random), ``planted`` (a super weight at L1[5, 17]), ``arithmetic`` (the
    planted arithmetic model of the arithmetic tests: heads copy the operands, neurons write the answer)."""
    from tests.test_arithmetic_planted import planted_arithmetic_model

    root = tmp_path_factory.mktemp("cli")
    base = save_tiny_llama(root / "base", layers=2)
    planted = save_tiny_llama(root / "planted", layers=4)
    model = AutoModelForCausalLM.from_pretrained(planted)
    plant_super_weight(model, layer=1, row=5, col=17)
    model.save_pretrained(planted, safe_serialization=True)
    arithmetic = root / "arithmetic"
    loaded = planted_arithmetic_model()
    loaded.model.save_pretrained(arithmetic, safe_serialization=True)
    byte_tokenizer().save_pretrained(arithmetic)
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS_TEXT)
    return {"base": base, "planted": planted, "arithmetic": arithmetic, "corpus": corpus}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main([*argv, "--no-progress"] if argv[0] not in ("checks", "models", "pin") else list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def document(out: str) -> dict[str, Any]:
    data = json.loads(out)
    assert data["schema"] == "lmaudit-cli" and data["schema_version"] == 1
    return data


# ------------------------------------------------------------------------------------------------ listing


def test_checks_lists_every_registered_check_with_area_params_and_metrics(capsys):
    registry = load_checks()
    status, out, _ = run(capsys, "checks", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert status == 0 and set(rows) == set(registry)
    for name, spec in registry.items():
        assert rows[name]["area"] == spec.area and rows[name]["metrics"] == list(spec.metrics)
        assert set(rows[name]["params"]) == set(spec.params.model_fields)
        assert rows[name]["summary"] == spec.summary != ""  # every check documents itself
    assert rows["superweights"]["params"]["spike_factor"] == 50.0
    status, out, _ = run(capsys, "checks")
    assert status == 0 and all(name in out for name in registry)


def test_models_lists_the_aliases(capsys):
    status, out, _ = run(capsys, "models", "--json")
    rows = json.loads(out)
    assert status == 0 and any(row["default"] for row in rows)


def test_inspect(models, capsys):
    status, out, _ = run(capsys, "inspect", "--model", str(models["base"]), "--json")
    summary = json.loads(out)
    assert status == 0 and summary["n_layers"] == 2 and summary["model_type"] == "llama"
    status, out, _ = run(capsys, "inspect", "--model", str(models["base"]))
    assert status == 0 and "down_proj" in out


# ------------------------------------------------------------------------------------------------ super weights


def test_superweights_finds_the_planted_super_weight(models, capsys):
    status, out, err = run(capsys, "superweights", "--model", str(models["planted"]), "--json")
    data = document(out)
    (record,) = data["results"]
    assert status == 0 and err == ""
    assert record["check"] == "superweights" and record["status"] == "measured"
    assert record["metrics"]["coordinates"] == [[1, 5, 17]]
    assert record["result_type"] == "SuperWeightDirectory" and data["model"]["parameters"] > 0
    status, out, _ = run(capsys, "superweights", "--model", str(models["planted"]))
    assert status == 0 and "L1[5, 17]" in out


def test_superweights_on_a_model_without_one_says_why_not_zero(models, capsys):
    status, out, err = run(capsys, "superweights", "--model", str(models["base"]))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lmaudit: premise missing") and "no layer spiked" in err
    status, out, err = run(capsys, "superweights", "--model", str(models["base"]), "--json")
    (record,) = document(out)["results"]  # the JSON says it was skipped, with the reason; never [] or 0
    assert status == 2 and record["status"] == "skipped" and "PremiseMissing" in record["reason"]


# ------------------------------------------------------------------------------------------------ quantization


def test_quantize_runs_the_registered_recovery_check(models, capsys):
    corpus = str(models["corpus"])
    argv = ["quantize", "--model", str(models["planted"]), "--scheme", "w8a8", "--corpus", corpus,
            "--corpora", corpus, "--seq-len", "32", "--n-windows", "2", "--param", "calibration_windows=1"]
    status, out, err = run(capsys, *argv, "--json")
    records = document(out)["results"]
    assert [r["params"]["scheme"] for r in records] == ["w8a8-per-token", "w8a8-per-tensor"]
    assert all(r["check"] == "quantization_recovery" and r["params"]["n_windows"] == 2 for r in records)
    measured = [r for r in records if r["status"] == "measured"]
    assert status == (0 if len(measured) == 2 else 2)
    for record in measured:
        assert record["metrics"]["n_super_weights"] == 1 and "recovery" in record["metrics"]
    if status == 2:  # naive W8A8 did no damage on this tiny model: the premise line says so
        assert err.startswith("lmaudit: premise missing") and "does no damage" in err


# ------------------------------------------------------------------------------------------------ bias


def test_bias_scores_and_an_edit_without_premise(models, capsys):
    status, out, _ = run(capsys, "bias", "--model", str(models["base"]), "--json", "--param", "n_permutations=200")
    (record,) = document(out)["results"]
    assert status == 0 and record["check"] == "occupation_bias"
    assert record["metrics"]["n_templates"] >= 2 and "correlation_p" in record["metrics"]
    base_p = record["metrics"]["correlation_p"]
    argv = ["bias", "--model", str(models["base"]), "--edit", "--neuron-fraction", "0.05", "--corpus",
            str(models["corpus"]), "--param", "n_permutations=200", "--param", "seq_len=32"]
    status, out, err = run(capsys, *argv, "--json")
    scores, edit = document(out)["results"]
    assert scores["status"] == "measured" and edit["check"] == "bias_editing"
    assert edit["params"]["neuron_fraction"] == 0.05 and edit["params"]["top_fraction"] == 0.25  # quick look
    if base_p > 0.05:  # a random model shows no bias: the scores are printed, the edit says why it was skipped
        assert status == 2 and edit["status"] == "skipped" and err.startswith("lmaudit: premise missing")
        status, out, err = run(capsys, *argv)
        assert status == 2 and "total bias" in out and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ arithmetic

PLANTED_PROBLEMS = ["--ops", "+-*", "--templates", "symbolic", "--few-shot", "0"]


def test_heads_confirms_the_planted_operand_heads(models, capsys):
    argv = ["heads", "--model", str(models["arithmetic"]), *PLANTED_PROBLEMS, "--n-per-op", "6",
            "--confirm-per-op", "12"]
    status, out, _ = run(capsys, *argv, "--json")  # the quick look: the middle fifth of the depth, not layer 0
    (record,) = document(out)["results"]
    assert status == 0 and record["params"]["layer_fraction"] == [0.4, 0.6]
    assert record["metrics"]["n_heads"] == 16 and record["metrics"]["n_significant"] == 0  # layer 2 of 5
    argv.append("--thorough")  # the check's own defaults: every layer, as the audit entry
    status, out, _ = run(capsys, *argv, "--json")
    (record,) = document(out)["results"]
    assert status == 0 and record["check"] == "arithmetic_head_sweep"
    assert record["params"]["layer_fraction"] == [0.0, 1.0] and record["metrics"]["n_heads"] == 5 * 16
    assert record["metrics"]["n_significant"] >= 1
    assert set(record["metrics"]["significant_heads"]) <= {"L0.H0", "L0.H1", "L0.H2"}  # the operand heads
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "significant heads: L0.H" in out


def test_neurons_runs_the_registered_intervention_without_a_prompt(models, capsys):
    argv = ["neurons", "--model", str(models["arithmetic"]), "--ops", "+-*", "--top", "4", "--param",
            "templates=[symbolic]", "--param", "few_shot=0", "--param", "n_score=4", "--param", "score_pool=8",
            "--param", "min_score=8"]
    status, out, _ = run(capsys, *argv, "--json")
    (record,) = document(out)["results"]
    assert status == 0 and record["check"] == "arithmetic_cna_intervention"
    assert record["params"]["k"] == 4 and record["params"]["n_per_op"] == 8  # --top, and the quick look
    assert record["metrics"]["n_random"] >= 20
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "random draws" in out


def test_run_any_registered_check(models, capsys):
    argv = ["run", "perplexity", "--model", str(models["base"]), "--corpus", str(models["corpus"]),
            "--param", "seq_len=16", "--param", "n_windows=2"]
    status, out, _ = run(capsys, *argv, "--json")
    (record,) = document(out)["results"]
    assert status == 0 and record["metrics"]["n_tokens"] == 32 and record["corpora"]
    status, out, _ = run(capsys, *argv)
    assert status == 0 and "perplexity" in out


def test_run_with_a_compare_model(models, capsys):
    """``--compare-model`` reaches the check through the audit context, loaded with the same options."""
    argv = ["run", "superweights_finetune_invariance", "--model", str(models["planted"]), "--compare-model",
            str(models["planted"]), "--json"]
    status, out, _ = run(capsys, *argv)
    (record,) = document(out)["results"]
    assert status == 0 and record["metrics"]["same_coordinates"] is True
    assert record["metrics"]["tuned_coordinates"] == [[1, 5, 17]]


# ------------------------------------------------------------------------------------------------ pin


def test_pin_wraps_pytest_with_the_audit_pin_option(models, capsys, monkeypatch, tmp_path):
    import pytest as pytest_module

    seen: list[list[str]] = []
    monkeypatch.setattr(pytest_module, "main", lambda argv: seen.append(argv) or 0)
    pin = tmp_path / "audit_tiny.yaml"
    status, _, _ = run(capsys, "pin", str(pin), "--model", str(models["base"]), "--audits", str(tmp_path),
                       "--profile", "quick", "--device", "cpu", "--", "-x")
    assert status == 0
    (argv,) = seen
    assert argv[0] == str(tmp_path) and argv[argv.index("--audit-pin") + 1] == str(pin)
    assert argv[argv.index("--audit-profile") + 1] == "quick" and argv[-1] == "-x"
    monkeypatch.setattr(pytest_module, "main", lambda argv: pytest_module.ExitCode.INTERRUPTED)
    assert run(capsys, "pin", str(pin), "--model", str(models["base"]), "--audits", str(tmp_path))[0] == 130
