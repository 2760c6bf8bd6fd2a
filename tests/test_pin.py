"""One-command pinning (``--audit-pin``) on tiny planted models: the round trip, deviations as strict xfails, pins
kept out of the default collection, and premise-missing skips (with their dependents).

The model changes are planted on disk: ``changed`` is the pinned model with its last layer scaled (so metrics of
the last layer move and those of layer 0 do not), ``deeper`` has three layers (so the hand-written claim "three
layers" starts to hold).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lmaudit.checks.harness.pin import pin_threshold, rule_for
from tests.checkpoints import save_tiny_llama
from tests.test_plugin import FAKE_CONFTEST, write_audit
from tests.test_plugin import isolated_result_cache as isolated_result_cache  # noqa: F401  (autouse)

pytestmark = pytest.mark.usefixtures("one_thread")

PIN_CONFTEST = FAKE_CONFTEST + '''

import time
from pathlib import Path

import torch

from lmaudit.checks.core.errors import PremiseMissing


class WeightParams(CheckParams):
    prompt: str = "the cat sat on the mat"


@dataclass(frozen=True)
class WeightStats(CheckResult):
    n_layers: int = metric_field()
    layer0_norm: float = metric_field()
    last_layer_norm: float = metric_field()
    next_token: int = metric_field()
    perplexity: float = metric_field()
    seconds: float = metric_field()


def fake_weights(context, params) -> WeightStats:
    """Deterministic statistics of the weights and of one prompt's log-likelihood."""
    started = time.perf_counter()
    loaded = context.model
    layers = loaded.adapter.layer_list
    norm = lambda layer: float(sum(p.double().norm() for p in layer.parameters()))
    ids = loaded.tokenizer(params.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])
    return WeightStats(len(layers), norm(layers[0]), norm(layers[-1]), int(logits[-1].argmax()),
                       float(torch.exp(-logp.mean())), time.perf_counter() - started)


class Sites:
    """A planted detection that finds nothing on these models."""


def _sites(context):
    with open("builds.txt", "a") as handle:
        handle.write("built\\n")
    raise PremiseMissing("no planted site: looked for |w| > 100 in every down projection, largest 0.3")


def fake_premise(context, params) -> FakeResult:
    """Needs the planted sites."""
    context.artifact(Sites, "sites", lambda: _sites(context))
    return FakeResult(1.0, "x", 0, [])


def fake_dependent(context, params) -> FakeResult:
    """Also needs the planted sites (the same cached detection)."""
    context.artifact(Sites, "sites", lambda: _sites(context))
    return FakeResult(2.0, "y", 0, [])


if "fake_weights" not in CHECKS:
    register_check("fake_weights", params=WeightParams, area="model")(fake_weights)
    register_check("fake_premise", params=FakeParams, area="superweights")(fake_premise)
    register_check("fake_dependent", params=FakeParams, area="quantization")(fake_dependent)
'''

CLAIMS = """
audits:
  - name: stats
    check: fake_weights
    claim: "the paper's model has three layers"
    expect: {n_layers: {equals: 3}, perplexity: {max: 10000}}
  - name: other_prompt
    check: fake_weights
    params: {prompt: "a different prompt"}
    expect: {n_layers: {min: 1}}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pin-models")
    pinned = save_tiny_llama(root / "pinned")
    changed = save_tiny_llama(root / "changed")
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        for parameter in model.model.layers[-1].mlp.parameters():
            parameter.mul_(1.5)  # the last layer's MLP moves; layer 0 does not
    model.save_pretrained(changed, safe_serialization=True)
    return {"pinned": pinned, "changed": changed, "deeper": save_tiny_llama(root / "deeper", layers=3)}


@pytest.fixture
def sandbox(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(PIN_CONFTEST)
    (pytester.path / "audits" / "pins").mkdir(parents=True)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest_inprocess(*args, "--audit-json", "r.json", "-p", "no:cacheprovider")
    path = pytester.path / "r.json"
    return result, json.loads(path.read_text()) if path.is_file() else {}


def rows(data: dict) -> dict[str, dict]:
    return {row["key"]: row for row in data["audits"]}


def test_pin_round_trip_deviation_regression_and_agreement(sandbox: pytest.Pytester, models: dict[str, Path]) -> None:
    write_audit(sandbox, CLAIMS, name="claims.yaml")
    pin = sandbox.path / "audits" / "pins" / "audit_tiny.yaml"

    # 1. Pin on the model: the hand-written claim fails (a deviation), the pin is written anyway.
    result, data = run(sandbox, "audits/", "--model", str(models["pinned"]), "--audit-pin", str(pin))
    assert result.ret == pytest.ExitCode.TESTS_FAILED and data["verdict"] == "FAIL"
    assert any(line.startswith("lmaudit: pin written: ") and "2 entries, 1 deviations" in line
               for line in result.outlines)
    document = yaml.safe_load(pin.read_text())
    header = document["pinned"]
    assert header["weights"] == data["run"]["model"]["content_hash"] and len(header["weights"]) == 64
    assert header["generated_by"] == "generated by --audit-pin" and header["dtype"] == "float32"
    assert header["source"] == ["claims.yaml"] and header["profiles"] == ["full"] and header["lmaudit"]
    [deviation] = header["deviations"]
    assert deviation["audit"] == "claims.yaml::stats" and deviation["strict"] is True
    assert "the paper's model has three layers" in deviation["reason"]
    assert "n_layers expected == 3, measured 2" in deviation["reason"]
    entry = next(e for e in document["audits"] if e["name"] == "claims.stats")
    expect = entry["profiles"]["full"]["expect"]
    assert expect["n_layers"] == {"equals": 2} and "seconds" not in expect
    assert expect["perplexity"]["rel"] == 1e-3 and expect["layer0_norm"]["rel"] == 1e-2
    assert entry["profiles"]["full"]["params"] == {"prompt": "the cat sat on the mat"}

    # 2. Pins are not collected by `pytest audits/`.
    result, data = run(sandbox, "audits/", "--model", str(models["pinned"]))
    assert len(data["audits"]) == 2

    # 3. With the pin in the run, on the same model: everything passes, the deviation is expected.
    result, data = run(sandbox, "audits/", "--model", str(models["pinned"]), "--audit-pins", "audits/pins")
    by_key = rows(data)
    assert result.ret == 0 and data["verdict"] == "PASS", result.outlines
    assert by_key["claims.yaml::stats"]["status"] == "xfailed"
    assert "recorded by a pin" in by_key["claims.yaml::stats"]["message"]
    pinned_row = by_key["pins/audit_tiny.yaml::claims.stats"]
    assert pinned_row["status"] == "passed" and pinned_row["pin"]["same_weights"] is True
    assert any(note.startswith("pinned on these weights") for note in pinned_row["notes"])
    assert data["run"]["pins"][0]["same_weights"] is True
    html = (sandbox.path / "audit-report.html").read_text()
    assert 'id="pins-table"' in html and "pinned on these weights" in html

    # 3b. At another precision the row says so (and bfloat16 tensors are other weights).
    result, data = run(sandbox, str(pin), "--model", str(models["pinned"]), "--audit-dtype", "bfloat16")
    row = rows(data)["pins/audit_tiny.yaml::claims.stats"]
    assert "thresholds pinned at float32, measured now at bfloat16" in row["notes"]
    assert "(run at bfloat16)" in (sandbox.path / "audit-report.html").read_text()

    # 4. On a changed model, the pin named on the command line fails exactly the metrics that moved, with deltas.
    result, data = run(sandbox, str(pin), "--model", str(models["changed"]))
    by_key = rows(data)
    row = by_key["pins/audit_tiny.yaml::claims.stats"]
    assert row["status"] == "failed" and row["pin"]["same_weights"] is False
    assert any(note.startswith("pinned on other weights") for note in row["notes"])
    failing = {c["metric"] for c in row["comparisons"] if not c["passed"]}
    assert "last_layer_norm" in failing and not failing & {"layer0_norm", "n_layers"}
    original = yaml.safe_load(pin.read_text())["audits"][0]["profiles"]["full"]["expect"]
    for c in row["comparisons"]:
        target = original[c["metric"]].get("approx", original[c["metric"]].get("equals"))
        moved = c["measured"] != target if isinstance(target, int) else abs(c["measured"] - target) > 1e-9
        assert (not c["passed"]) == moved or c["metric"] == "perplexity", c
    assert "last_layer_norm: expected ≈" in row["message"] and "(Δ +" in row["message"]
    assert "pinned on other weights" in (sandbox.path / "audit-report.html").read_text()

    # 4b. A pin of any name, anywhere, runs when named on the command line.
    elsewhere = sandbox.path / "my-pin.yaml"
    elsewhere.write_text(pin.read_text())
    result, data = run(sandbox, str(elsewhere), "--model", str(models["pinned"]))
    assert result.ret == 0 and len(data["audits"]) == 2 and data["run"]["pins"][0]["file"] == "my-pin.yaml"

    # 5. A model that now agrees with the claim fails the strict deviation, saying so.
    result, data = run(sandbox, "audits/", "--model", str(models["deeper"]), "--audit-pins", str(pin))
    stats = rows(data)["claims.yaml::stats"]
    assert stats["status"] == "failed" and "the model now agrees" in stats["message"]


def test_a_pin_regenerated_in_another_profile_keeps_both(sandbox: pytest.Pytester, models: dict[str, Path]) -> None:
    write_audit(sandbox, CLAIMS.replace("    expect: {n_layers: {min: 1}}",
                                        "    profiles: {quick: {params: {prompt: ab}}, full: {}}"), name="claims.yaml")
    pin = sandbox.path / "audits" / "pins" / "audit_tiny.yaml"
    run(sandbox, "audits/", "--model", str(models["pinned"]), "--audit-pin", str(pin), "--audit-profile", "quick")
    run(sandbox, "audits/", "--model", str(models["pinned"]), "--audit-pin", str(pin))
    document = yaml.safe_load(pin.read_text())
    assert document["pinned"]["profiles"] == ["full", "quick"]
    entry = next(e for e in document["audits"] if e["name"] == "claims.other_prompt")
    assert entry["profiles"]["quick"]["params"] == {"prompt": "ab"}
    assert entry["profiles"]["full"]["params"] == {"prompt": "a different prompt"}
    assert {d["profile"] for d in document["pinned"]["deviations"]} == {"quick", "full"}
    result, data = run(sandbox, str(pin), "--model", str(models["pinned"]), "--audit-profile", "quick")
    assert result.ret == 0 and {r["status"] for r in data["audits"]} == {"passed"}


def test_an_interrupted_or_unloaded_run_writes_no_pin(sandbox: pytest.Pytester, tmp_path: Path) -> None:
    write_audit(sandbox, CLAIMS, name="claims.yaml")
    pin = sandbox.path / "audits" / "pins" / "audit_x.yaml"
    result, data = run(sandbox, "audits/", "--model", str(tmp_path / "typo"), "--audit-pin", str(pin))
    assert not pin.exists() and data["verdict"] == "ERROR"
    assert any("pin not written: the model did not load" in e for e in data["run"]["write_errors"])


def test_premise_missing_skips_the_check_and_its_dependents_with_the_reason(
    sandbox: pytest.Pytester, models: dict[str, Path]
) -> None:
    write_audit(sandbox, """
audits:
  - {name: needs_sites, check: fake_premise}
  - {name: also_needs_sites, check: fake_dependent}
  - {name: unrelated, check: fake_value}
""", name="premise.yaml")
    pin = sandbox.path / "audits" / "pins" / "audit_p.yaml"
    result, data = run(sandbox, "audits/", "--model", str(models["pinned"]), "--audit-pin", str(pin))
    result.assert_outcomes(skipped=2, passed=1)
    needs, also, _ = data["audits"]
    reason = "premise missing: no planted site: looked for |w| > 100 in every down projection, largest 0.3"
    assert needs["status"] == also["status"] == "skipped" and needs["message"] == also["message"] == reason
    assert (sandbox.path / "builds.txt").read_text() == "built\n", "the detection ran once"
    assert data["verdict"] == "PASS" and data["claims_checked"] == 1
    not_pinned = yaml.safe_load(pin.read_text())["pinned"]["not_pinned"]
    assert any(line.startswith("premise.yaml::needs_sites: skipped: premise missing") for line in not_pinned)


@pytest.mark.parametrize(("metric", "value", "dtype", "expected"), [
    ("n_layers", 30, "float32", {"equals": 30}),
    ("coordinates", [2, 7, 11], "float32", {"equals": [2, 7, 11]}),
    ("found", True, "float32", {"equals": True}),
    ("perplexity", 19.75, "float32", {"approx": 19.75, "rel": 1e-3}),
    ("mean_nll", 2.9, "bfloat16", {"approx": 2.9, "rel": 0.1}),
    ("accuracy", 0.5, "float32", {"approx": 0.5, "rel": 1e-2, "abs": 1e-3}),
    ("sign_test_p", 1e-9, "float32", {"approx": 1e-9, "rel": 0.05}),
    ("max_activation", 1234.5, "float32", {"approx": 1234.5, "rel": 1e-2}),
    ("perplexity", float("nan"), "float32", {"equals": "nan"}),
    ("seconds", 3.2, "float32", None),
    ("load_s", 1.0, "float32", None),
    ("peak_memory_ratio", 1.65, "float32", None),
    ("control_reduction_mean_pct", 0.0046, "float32", {"approx": 0.0046, "rel": 1e-2, "abs": 1e-2}),
    ("optional", None, "float32", None),
])
def test_pin_tolerance_per_kind_of_metric(metric: str, value, dtype: str, expected) -> None:
    assert pin_threshold(metric, value, dtype) == expected


def test_tolerance_kinds_are_named() -> None:
    assert [rule_for(m).kind for m in ("perplexity_ratio", "accuracy_drop", "duration_s", "p_value", "norm")] == [
        "log-likelihood", "share", "timing", "p-value", "other float"]
