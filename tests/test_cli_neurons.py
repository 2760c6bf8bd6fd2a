"""``lmaudit neurons`` end to end on tiny checkpoints: a planted answer neuron ranks first, with its logit lens,
and ``--compare-model`` shows that the unplanted model lacks it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from lmaudit.checks.cli.main import main
from tests.checkpoints import byte_tokenizer, save_tiny_llama
from tests.test_neuron_scores import plant_answer_neuron

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(planted, base): two saved tiny Llamas, the first with neuron 9 of layer 1 writing '4' after '12+34='."""
    root = tmp_path_factory.mktemp("neurons")
    base = save_tiny_llama(root / "base", layers=2)
    planted_dir = save_tiny_llama(root / "planted", layers=2)
    model = AutoModelForCausalLM.from_pretrained(planted_dir)
    plant_answer_neuron(model, byte_tokenizer(), "12+34=", "4", layer=1, neuron=9)
    model.save_pretrained(planted_dir, safe_serialization=True)
    return planted_dir, base


def test_neurons_ranks_the_planted_neuron_first_with_its_lens(checkpoints, capsys):
    planted, _ = checkpoints
    # the symbolic prompt's own answer would be "46": --target names the planted token instead
    assert main(["neurons", "--model", str(planted), "--prompt", "12+34=", "--target", "4", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["results"]
    assert record["check"] is None and record["result_type"] == "PromptNeurons"  # the CNA science, one prompt
    first = record["result"]["neurons"][0]
    assert (first["layer"], first["neuron"]) == (1, 9)
    assert first["importance"] > 0 and first["promotes"][0] == "4"


def test_neurons_compare_model_shows_the_difference_and_the_lens(checkpoints, capsys):
    planted, base = checkpoints
    argv = ["neurons", "--model", str(planted), "--prompt", "12+34=", "--target", "4", "--compare-model", str(base)]
    assert main([*argv, "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)["results"]
    assert record["result_type"] == "CnaComparison" and record["metrics"]["top_neuron_a"] == "L1.N9"
    row = record["result"]["rows"][0]
    assert (row["layer"], row["neuron"]) == (1, 9) and row["importance_b"] < row["importance_a"]
    assert row["promotes"][0] == "4"
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "L1.N9" in text and "'4'" in text and "overlap" in text
