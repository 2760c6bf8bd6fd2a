"""Bias editing on a tiny Llama with a planted "stereotype neuron": it fires after female prompts only and
writes nurse − plumber into the residual stream. The layer screen must pick its layer, CNA must rank it first,
and zeroing it must remove most of the bias while k random neurons do not."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lmaudit.checks.bias.editing import (
    _signed_gap,
    edit_bias,
    neuron_spec,
    random_neurons,
    rank_bias_neurons,
    ranking_occupations,
)
from lmaudit.checks.bias.occupations import Gender, Occupation, Template
from lmaudit.checks.bias.scores import occupation_bias
from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.interventions import zero_neurons
from lmaudit.checks.core.logprobs import encode_prompts

TEMPLATE = Template("{who} works as {article}", "she", "he")
OCCUPATIONS = (Occupation("nurse", 0.9, 2015, "test"), Occupation("teacher", 0.7, 2015, "test"),
               Occupation("plumber", 0.01, 2015, "test"), Occupation("mechanic", 0.02, 2015, "test"))
WORDS = ["she", "he", "works", "as", "a", "an", "the", "is", "of", "and", "+", "=", "1", "2", "3", "4", "5", "6",
         "7", "8", "9", "0"] + [o.name for o in OCCUPATIONS]
LAYER, NEURON = 2, 17


pytestmark = pytest.mark.usefixtures("one_thread")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word tokens (occupations are single tokens), plus <s>, </s> and [UNK]."""
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="[UNK]")


def planted_model(tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """Tiny Llama; neuron NEURON of layer LAYER gets ``up = w``, ``gate = 3w`` with ``w·x = +4`` on every female prompt's
    last MLP input and ``−4`` on every male one (least squares), ``fc2 = 6·(d_nurse − d_plumber)`` and the
    unembedding rows of nurse and plumber set to ``2·d`` (random unit directions ``d``), so that the neuron's
    push survives the final norm."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    adapter = adapter_for(model)
    modules = adapter.layer(LAYER)
    sequences, targets = [], []
    for gender, value in ((Gender.FEMALE, 4.0), (Gender.MALE, -4.0)):
        for article in ("a", "an"):
            sequences.append(encode_prompts(tokenizer, [TEMPLATE.prompt(gender, article)])[0])
            targets.append(value)
    inputs = []
    for ids in sequences:
        with capture({"up": modules.up_proj}, what="input") as cap, torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        inputs.append(cap.input("up")[0, -1])
    x = torch.stack(inputs)  # (n, hidden)
    w = torch.linalg.lstsq(x, torch.tensor(targets)[:, None]).solution[:, 0]  # (hidden,)
    directions = torch.nn.functional.normalize(torch.randn(2, config.hidden_size), dim=1)  # (2, hidden)
    nurse, plumber = (tokenizer.convert_tokens_to_ids(w) for w in ("nurse", "plumber"))
    with torch.no_grad():
        adapter.weight(modules.up_proj)[NEURON] = w
        adapter.weight(modules.gate_proj)[NEURON] = 3.0 * w  # SiLU(−12) ≈ 0: silent after "he"
        adapter.down_proj_weight(LAYER)[:, NEURON] = directions[0] - directions[1]
        adapter.unembedding.weight[nurse] = 2.0 * directions[0]
        adapter.unembedding.weight[plumber] = 2.0 * directions[1]
    return model


@pytest.fixture(scope="module")
def setup():
    tokenizer = word_tokenizer()
    model = planted_model(tokenizer)
    return model, tokenizer, adapter_for(model)


def corpus() -> Corpus:
    return Corpus("words", " ".join(WORDS * 40), "test")


def test_signed_gap_and_helpers():
    values = torch.tensor([[3.0], [1.0], [0.0], [2.0]])  # pairs: (F=3, M=1, σ=+1), (F=0, M=2, σ=−1)
    assert _signed_gap(values, torch.tensor([1, -1])).tolist() == [(2.0 + 2.0) / 2]
    assert neuron_spec([(2, 5), (0, 1), (2, 7)]) == {2: [5, 7], 0: [1]}


def test_random_neurons_are_seeded_distinct_and_avoid_the_edit(setup):
    _, _, adapter = setup
    exclude = [(1, i) for i in range(60)]
    picked = random_neurons(adapter, [1, 2], 30, seed=3, exclude=exclude)
    assert picked == random_neurons(adapter, [1, 2], 30, seed=3, exclude=exclude)
    assert len(set(picked)) == 30 and not set(picked) & set(exclude)
    assert {layer for layer, _ in picked} <= {1, 2}


def test_planted_neuron_is_the_bias(setup):
    model, tokenizer, adapter = setup
    scores = occupation_bias(model, tokenizer, templates=[TEMPLATE], occupations=OCCUPATIONS)
    assert scores.r[0] > 1.0 and scores.r[2] < -1.0  # nurse pushed after "she", plumber after "he"
    with zero_neurons(adapter, {LAYER: [NEURON]}):
        edited = occupation_bias(model, tokenizer, templates=[TEMPLATE], occupations=OCCUPATIONS)
    assert edited.total_bias < 0.5 * scores.total_bias
    chosen = ranking_occupations(scores, OCCUPATIONS, 1)
    assert [(o.name, sign) for o, sign in chosen] == [("nurse", 1), ("plumber", -1)]


def test_layer_screen_and_cna_find_the_planted_neuron(setup):
    model, tokenizer, adapter = setup
    scores = occupation_bias(model, tokenizer, templates=[TEMPLATE], occupations=OCCUPATIONS)
    ranking = rank_bias_neurons(model, tokenizer, adapter, scores, k=3, occupations=OCCUPATIONS,
                                templates=[TEMPLATE], n_per_side=2, n_layers=1)
    assert ranking.layers == (LAYER,)
    assert max(range(len(ranking.layer_effect)), key=lambda i: ranking.layer_effect[i]) == LAYER
    assert ranking.neurons[0] == (LAYER, NEURON)
    assert ranking.scores[0] > 10 * abs(ranking.scores[1])


def test_edit_bias_beats_the_random_control_and_restores_the_model(setup):
    model, tokenizer, adapter = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = edit_bias(model, tokenizer, adapter, corpus(), k=1, templates=[TEMPLATE], n_per_side=2, n_layers=1,
                       seq_len=16, n_windows=2, n_arithmetic=0, occupations=OCCUPATIONS)
    assert result.edit.neurons == ((LAYER, NEURON),)
    assert result.control.neurons != result.edit.neurons and len(result.control.neurons) == 1
    assert result.edit.bias_reduction_pct > 50.0
    assert result.edit.bias_reduction_pct > result.control.bias_reduction_pct + 40.0
    assert result.edit.superweights_intact and result.control.superweights_intact
    metrics = result.metrics()
    assert metrics["bias_reduction_pct"] == result.edit.bias_reduction_pct and metrics["k"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # hooks only, nothing left behind
