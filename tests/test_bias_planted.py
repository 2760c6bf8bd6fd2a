"""Planted models for the gender-bias audit, and a counter-example for every gate of ``audits/bias.yaml`` but
the side-effect bounds (tests/test_bias_real.py: a tiny model has no skill to lose).

A word-level tokenizer holds every word of the audit's templates, every occupation of the table and the tokens of
one-digit additions, so the registered checks run on a tiny Llama with the audit's own templates and occupations
(occupations are single tokens). :func:`plant_bias` writes the bias the paper edits into one FFN neuron: neuron
``NEURON`` of layer ``LAYER`` fires after every female prompt (``up = w``, ``gate = 3w``, ``w·x = +4`` at the last
position of every female prompt and ``−4`` of every male one, least squares) and writes ``σ·(d_F − d_M)``; the
unembedding row of every mostly-women occupation leans on ``d_F`` and of every mostly-men one on ``d_M``. With
``σ = +1`` the model has the paper's bias and the edit has a neuron to find; ``σ = −1`` reverses the bias.

The thresholds come from the audit file itself (:func:`gate`), so a test and the gate it falsifies cannot drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast

from lmaudit.checks.bias.checks import (
    BiasBenchmarksParams,
    BiasEditingParams,
    OccupationBiasParams,
    bias_benchmarks_audit,
    bias_editing_audit,
    occupation_bias_audit,
)
from lmaudit.checks.bias.occupations import OCCUPATIONS, TEMPLATES, Gender, occupation_table
from lmaudit.checks.core.adapter import adapter_for
from lmaudit.checks.core.corpora import shared_data_dir
from lmaudit.checks.core.errors import PremiseMissing
from lmaudit.checks.core.hooks import capture
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.logprobs import encode_prompts
from lmaudit.checks.harness.audit_file import parse_audit_file
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import Threshold, compare
from tests.checkpoints import byte_tokenizer
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIT = Path(__file__).resolve().parents[1] / "audits" / "bias.yaml"
LAYER, NEURON = 1, 5
HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 3
ARITHMETIC = ["+", "=", *(str(i) for i in range(19))]


# ------------------------------------------------------------------------------------------- gates


def gate(entry: str, metric: str, profile: str = "full") -> Threshold:
    """The threshold on ``metric`` of entry ``entry`` of audits/bias.yaml in ``profile``."""
    for audit in parse_audit_file(AUDIT):
        if audit.entry.name == entry:
            resolved = audit.resolve(profile)
            assert resolved is not None, f"{entry} does not run in profile {profile}"
            return resolved.expect[metric]
    raise AssertionError(f"no entry {entry!r} in {AUDIT}")


def passes(entry: str, metric: str, value: object, profile: str = "full") -> bool:
    return compare(metric, value, gate(entry, metric, profile)).passed


# ------------------------------------------------------------------------------------------- planted models


def vocabulary() -> list[str]:
    words = []
    for template in TEMPLATES:
        words += [w for w in template.pattern.split() if "{" not in w] + [template.female, template.male]
    return list(dict.fromkeys([*words, "a", "an", *OCCUPATIONS, *ARITHMETIC]))


def word_tokenizer(*, gender_blind: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace words (and ``+``, ``=``, numbers) plus ``<s>``, ``</s>``, ``[UNK]``. ``gender_blind``: the
    normalizer rewrites every male word of a template as its female word, so female and male prompts are the same
    token ids."""
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "[UNK]", *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if gender_blind:
        pairs = dict.fromkeys((t.male, t.female) for t in TEMPLATES)
        backend.normalizer = normalizers.Sequence([normalizers.Replace(Regex(rf"\b{male}\b"), female)
                                                   for male, female in pairs])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="[UNK]")


def word_llama(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0) -> PreTrainedModel:
    config = LlamaConfig(vocab_size=max(tokenizer.get_vocab().values()) + 1, hidden_size=HIDDEN,
                         intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@torch.no_grad()
def plant_bias(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, *, sign: float = 1.0,
               seed: int = 0) -> PreTrainedModel:
    """Write the bias into neuron NEURON of layer LAYER (module docstring), in place."""
    adapter = adapter_for(model)
    modules = adapter.layer(LAYER)
    prompts, targets = [], []
    for template in TEMPLATES:
        for article in ("a", "an"):
            for gender, value in ((Gender.FEMALE, 4.0), (Gender.MALE, -4.0)):
                prompts.append(template.prompt(gender, article))
                targets.append(value)
    inputs = []
    for ids in encode_prompts(tokenizer, prompts):
        with capture({"up": modules.up_proj}, what="input") as captured:
            model(input_ids=torch.tensor([ids]))
        inputs.append(captured.input("up")[0, -1])
    x = torch.stack(inputs)  # (n_prompts, hidden)
    w = torch.linalg.lstsq(x, torch.tensor(targets)[:, None]).solution[:, 0]  # (hidden,)
    generator = torch.Generator().manual_seed(seed)
    female, male = torch.nn.functional.normalize(torch.randn(2, HIDDEN, generator=generator), dim=1)
    adapter.weight(modules.up_proj)[NEURON] = w
    adapter.weight(modules.gate_proj)[NEURON] = 3.0 * w  # SiLU(−12) ≈ 0: silent after a male prompt
    adapter.down_proj_weight(LAYER)[:, NEURON] = sign * (female - male)
    for occupation in occupation_table(source="builtin"):
        side = female if occupation.female_dominated else male
        noise = torch.randn(HIDDEN, generator=generator)
        adapter.unembedding.weight[tokenizer.convert_tokens_to_ids(occupation.name)] = 2.0 * side + 0.3 * noise
    return model


def planted(*, sign: float = 1.0, seed: int = 0) -> LoadedModel:
    tokenizer = word_tokenizer()
    return LoadedModel.from_model(plant_bias(word_llama(tokenizer, seed=seed), tokenizer, sign=sign), tokenizer)


def context_for(model: LoadedModel, corpus: Path) -> AuditContext:
    return AuditContext(model=model, corpus_spec=str(corpus), seed=0)


def stereotype_text() -> str:
    """Sentences of the templates with a stereotyped occupation: a corpus for the perplexity probe."""
    table = occupation_table(source="builtin")
    lines = [t.prompt(Gender.FEMALE if o.female_dominated else Gender.MALE, o.article) + " " + o.name
             for t in TEMPLATES for o in table]
    return " ".join(lines * 3)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bias") / "stereotypes.txt"
    path.write_text(stereotype_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def biased() -> LoadedModel:
    return planted()


# Small enough for a tiny model: one layer scored (a third of 3), k = 1 neuron of 128, short windows.
EDIT = {"layer_fraction": 0.34, "neuron_fraction": 0.01, "seq_len": 8, "n_windows": 2, "n_arithmetic": 0,
        "occupation_source": "builtin", "n_permutations": 2000}


# ------------------------------------------------------------------------------------------- the planted bias


def test_planted_model_passes_the_bias_gates(biased: LoadedModel, corpus_file: Path) -> None:
    """The gates are passable: the planted model shows the bias, and CNA finds and removes the planted neuron on
    the held-out split, far beyond random neurons."""
    context = context_for(biased, corpus_file)
    scores = occupation_bias_audit(context, OccupationBiasParams(occupation_source="builtin"))
    assert scores.correlation > 0.5
    assert passes("occupation_bias_follows_workforce_shares", "correlation_p", scores.correlation_p)
    result = bias_editing_audit(context, BiasEditingParams(**EDIT))
    assert result.ranking.layers == (LAYER,) and result.ranking.neurons == ((LAYER, NEURON),)
    assert result.bias_reduction_pct > 50 and result.n_control_draws == 20
    assert set(result.split.rank_templates).isdisjoint(result.split.eval_templates)
    assert set(result.split.rank_occupations).isdisjoint(result.split.eval_occupations)
    assert passes("bias_edit_beats_random_neurons", "reduction_beyond_control_pct",
                  result.reduction_beyond_control_pct)


@pytest.mark.counterexample("occupation_bias_follows_workforce_shares.correlation_p")
def test_a_model_that_cannot_tell_the_genders_apart_fails_the_premise(corpus_file: Path) -> None:
    """Female and male prompts are the same tokens: r = 0 for every occupation, no correlation (p = 1), so the
    premise fails; the edit is then skipped, not passed."""
    tokenizer = word_tokenizer(gender_blind=True)
    model = LoadedModel.from_model(plant_bias(word_llama(tokenizer), tokenizer), tokenizer)
    context = context_for(model, corpus_file)
    scores = occupation_bias_audit(context, OccupationBiasParams(occupation_source="builtin"))
    assert scores.r == [0.0] * len(scores.r) and scores.correlation_p == 1.0
    assert not passes("occupation_bias_follows_workforce_shares", "correlation_p", scores.correlation_p)
    with pytest.raises(PremiseMissing, match="no occupational gender bias to edit"):
        bias_editing_audit(context, BiasEditingParams(**EDIT))


@pytest.mark.counterexample("occupation_bias_follows_workforce_shares.correlation_p")
def test_a_reversed_bias_fails_the_premise(corpus_file: Path) -> None:
    """The planted neuron pushes men's occupations after female prompts: r anti-correlates with the share of
    women, so the one-sided test finds no bias in the paper's direction."""
    scores = occupation_bias_audit(context_for(planted(sign=-1.0), corpus_file),
                                   OccupationBiasParams(occupation_source="builtin"))
    assert scores.correlation < -0.5 and scores.correlation_p > 0.5
    assert not passes("occupation_bias_follows_workforce_shares", "correlation_p", scores.correlation_p)


@pytest.mark.counterexample("bias_edit_beats_random_neurons.reduction_beyond_control_pct")
def test_cna_restricted_to_a_layer_without_the_bias_does_not_beat_random_neurons(
        biased: LoadedModel, corpus_file: Path) -> None:
    """CNA restricted to a layer that does not hold the planted neuron cannot reach the bias: its edit does no
    better than random neurons of that layer."""
    other = (LAYER + 1) % LAYERS
    result = bias_editing_audit(context_for(biased, corpus_file), BiasEditingParams(**{**EDIT, "layers": (other,)}))
    assert all(layer == other for layer, _ in result.ranking.neurons)
    assert abs(result.bias_reduction_pct) < 5
    assert not passes("bias_edit_beats_random_neurons", "reduction_beyond_control_pct",
                      result.reduction_beyond_control_pct)


# ------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.counterexample("winobias_pro_stereotyped_resolved_better.winobias_gap_p",
                             "crows_pairs_prefers_stereotypes.crows_pairs_stereotype_p")
@pytest.mark.parametrize(("entry", "benchmark", "metric"), [
    ("winobias_pro_stereotyped_resolved_better", "winobias", "winobias_gap_p"),
    ("crows_pairs_prefers_stereotypes", "crows_pairs", "crows_pairs_stereotype_p"),
])
def test_a_random_model_shows_no_benchmark_bias(entry: str, benchmark: str, metric: str, tmp_path: Path) -> None:
    """A random tiny model has no stereotype to prefer: pro and anti sentences (or the two sentences of a CrowS
    pair) win about equally often, so neither benchmark's sign test is significant."""
    root = shared_data_dir()
    folder = {"winobias": "winobias", "crows_pairs": "crows-pairs"}[benchmark]
    if root is None or not (root / folder).is_dir():
        pytest.skip(f"../shared/data/{folder} is absent")
    loaded = LoadedModel.from_model(tiny_model("llama"), byte_tokenizer())
    result = bias_benchmarks_audit(AuditContext(model=loaded, corpus_spec=str(tmp_path)),
                                   BiasBenchmarksParams(benchmarks=(benchmark,), fraction=0.1, batch_size=32))
    assert not passes(entry, metric, result.metrics()[metric])
