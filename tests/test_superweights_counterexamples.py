"""Every gate of audits/superweights.yaml fails on some model: each test builds a tiny model on which the registered
check (or its science function, for gates that need a task the registry does not list) misses the gate's
threshold, read from the audit file itself. Most also show the gate passing on a model that has the property.
Each counter-example names the gates it fails in its marker (tests/test_gates.py checks that none is missing).

Fixture models (all tiny Llamas with the byte tokenizer):

- *BOS plant* (:func:`tests.test_superweights.plant_super_weight`): a super weight whose super activation sits on
  the BOS token only. A real super weight by the detector's test, but the random model does not rely on it.
- *everywhere plant* (:func:`plant_everywhere`): every token carries a constant "DC" channel ``k``; a neuron
  reading it writes a super activation into channel ``r`` at every position. The unembedding's columns ``r``
  and ``k`` then decide what the model predicts with and without the super weight.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmaudit.checks.catalog import load_checks
from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.core.zero_shot import ZeroShotTask
from lmaudit.checks.harness.audit_file import parse_audit_file
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.harness.thresholds import Comparison, compare
from lmaudit.checks.superweights.detect import detect
from lmaudit.checks.superweights.scaling import superweight_scaling
from tests.test_superweights import (
    COL,
    DC,
    ROW,
    TOKENIZER,
    _make_neuron_write_only,
    deeper,
    loaded,
    plant_everywhere,
    plant_super_weight,
)
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIT_FILE = Path(__file__).resolve().parent.parent / "audits" / "superweights.yaml"
TEXT = ("The super weight is a single scalar in the down projection of an early layer. When it is pruned, the "
        "model produces gibberish, and the probability of stopwords such as the, a and of goes up. ") * 40


@pytest.fixture(scope="module")
def entries() -> dict[str, Any]:
    load_checks()
    return {a.entry.name: a for a in parse_audit_file(AUDIT_FILE)}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def measure(entries: dict[str, Any], name: str, context: AuditContext, **params: Any) -> dict[str, Any]:
    """The metrics of entry ``name``'s registered check, run with the entry's full-profile parameters
    (``params`` merged over them, to keep tiny models fast)."""
    audit = entries[name]
    resolved = audit.resolve("full")
    return audit.spec.run(context, type(resolved.params).model_validate({**resolved.params.model_dump(),
                                                                        **params})).metrics()


def gate(entries: dict[str, Any], name: str, context: AuditContext, **params: Any) -> list[Comparison]:
    """Every threshold the audit file declares for entry ``name``, compared with what its check measures."""
    metrics = measure(entries, name, context, **params)
    return [compare(metric, metrics[metric], threshold)
            for metric, threshold in entries[name].resolve("full").expect.items()]


def context_for(model: torch.nn.Module, corpus_file: Path, spec: str = "tiny", **kwargs: Any) -> AuditContext:
    return AuditContext(model=loaded(model, spec), corpus_path=str(corpus_file), **kwargs)


# ------------------------------------------------------------------------------------------------ fixture models


def bos_planted() -> torch.nn.Module:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=ROW, col=COL)
    return model


def set_unembedding(model: torch.nn.Module, *, sa: torch.Tensor | None = None, dc: torch.Tensor | None = None) -> None:
    """Columns ROW (what the super activation predicts) and DC (what the model predicts without it) of W_U; the
    other columns are zeroed so the prediction is theirs alone."""
    w_u = ArchitectureAdapter(model).unembedding.weight  # (vocab, hidden)
    with torch.no_grad():
        w_u.zero_()
        if sa is not None:
            w_u[:, ROW] = sa
        if dc is not None:
            w_u[:, DC] = dc


def token_ids(*texts: str) -> list[int]:
    return [TOKENIZER.convert_tokens_to_ids(TOKENIZER.tokenize(t))[0] for t in texts]


def failed(comparisons: list[Comparison]) -> list[str]:
    return [c.metric for c in comparisons if not c.passed]


# ------------------------------------------------------------------------------------------------ directory


@pytest.mark.counterexample("superweights_directory.first_layer_fraction")
def test_directory_gate_fails_on_a_super_weight_deep_in_the_model(entries, corpus_file) -> None:
    """A super weight planted in layer 4 of 6 (two thirds of the depth) fails the directory gate; planted in
    layer 0, it passes."""
    late = deeper("llama", 6)
    plant_super_weight(late, layer=4, row=ROW, col=COL)  # 4 of 6 layers: 0.67 of the depth
    assert failed(gate(entries, "superweights_directory", context_for(late, corpus_file))) == ["first_layer_fraction"]
    early = deeper("llama", 6)
    plant_super_weight(early, layer=0, row=ROW, col=COL)
    assert failed(gate(entries, "superweights_directory", context_for(early, corpus_file))) == []


# ------------------------------------------------------------------------------------------------ invariance

PROMPTS = ["the river", "12+3=15", "def f(x):", "?!...", "Hello"]


def fire_on_token(adapter: ArchitectureAdapter, layer: int, col: int, token: int, channel: int) -> None:
    """Neuron ``col`` of ``layer`` fires on ``token`` and on nothing else: ``token``'s embedding becomes the unit
    vector of ``channel``, every other token carries the DC channel, which drives the neuron's gate far negative
    (SiLU ≈ 0), while ``channel`` drives gate and up positive."""
    with torch.no_grad():
        embedding = adapter.embedding.weight
        if float(embedding[:, DC].mean()) < 0.5:
            embedding[:, DC] += 1.0
        embedding[token] = 0.0
        embedding[token, channel] = 1.0
        up, gate_proj = adapter.weight(adapter.layer(layer).up_proj), adapter.weight(adapter.layer(layer).gate_proj)
        up[col], gate_proj[col] = 0.0, 0.0
        up[col, channel] = gate_proj[col, channel] = 10.0
        gate_proj[col, DC] = -20.0


def bos_only() -> torch.nn.Module:
    """A super weight whose neuron fires on the BOS token only."""
    model = tiny_model("llama")
    adapter = ArchitectureAdapter(model)
    fire_on_token(adapter, 1, COL, TOKENIZER.bos_token_id, channel=3)
    _make_neuron_write_only(adapter, 1, ROW, COL, 8.0)
    return model


@pytest.mark.counterexample("superweights_found_on_every_prompt.n_missed", "superweights_same_on_every_prompt.n_moved")
def test_prompt_gates_fail_when_the_super_weight_only_fires_on_bos(entries, corpus_file) -> None:
    """A super weight whose neuron fires on the BOS token only is missed by every prompt detected without BOS (so
    every prompt also finds a different set); one that fires on every token passes both gates."""
    # with BOS in front every prompt finds it; without, none does
    context = context_for(bos_only(), corpus_file, "bos-only")
    assert failed(gate(entries, "superweights_found_on_every_prompt", context, prompts=PROMPTS)) == ["n_missed"]
    assert failed(gate(entries, "superweights_same_on_every_prompt", context, prompts=PROMPTS)) == ["n_moved"]
    everywhere = tiny_model("llama")
    plant_everywhere(everywhere)  # fires on every token, whatever comes first
    context = context_for(everywhere, corpus_file, "everywhere")
    assert failed(gate(entries, "superweights_found_on_every_prompt", context, prompts=PROMPTS)) == []
    assert failed(gate(entries, "superweights_same_on_every_prompt", context, prompts=PROMPTS)) == []


@pytest.mark.counterexample("superweights_same_on_every_prompt.n_moved")
def test_same_set_gate_fails_on_an_extra_super_weight_for_one_first_token(entries, corpus_file) -> None:
    """A second super weight that fires only on "#" is confirmed by the prompt that starts with "#" alone: no
    prompt misses the reference super weight, but that prompt finds a different set."""
    model = deeper("llama", 6)  # two spike layers of three would be the median
    plant_everywhere(model)
    adapter = ArchitectureAdapter(model)
    fire_on_token(adapter, 0, 40, token_ids("#")[0], channel=3)  # a second one, on "#" only
    _make_neuron_write_only(adapter, 0, 9, 40, 8.0)
    context = context_for(model, corpus_file, "extra")
    prompts = [*PROMPTS, "# marks the spot"]
    assert failed(gate(entries, "superweights_found_on_every_prompt", context, prompts=prompts)) == []
    assert failed(gate(entries, "superweights_same_on_every_prompt", context, prompts=prompts)) == ["n_moved"]


@pytest.mark.counterexample("superweights_survive_finetuning.same_coordinates",
                             "superweights_survive_finetuning.same_channels")
def test_finetune_gates_fail_when_the_compared_model_moved_its_super_weight(entries, corpus_file) -> None:
    """The compared model's super weight sits in another input column (the coordinates differ) or in another row
    and column (the channels differ too); at the same place, both gates pass."""
    def compared(col: int, row: int) -> AuditContext:
        moved = tiny_model("llama")
        plant_super_weight(moved, layer=1, row=row, col=col)
        other = loaded(moved, f"moved-{row}-{col}")
        return context_for(bos_planted(), corpus_file, compare_model_spec=other.spec, load=lambda spec: other)

    assert failed(gate(entries, "superweights_survive_finetuning", compared(col=23, row=ROW))) == ["same_coordinates"]
    assert failed(gate(entries, "superweights_survive_finetuning", compared(col=23, row=9))) == [
        "same_coordinates", "same_channels"]
    assert failed(gate(entries, "superweights_survive_finetuning", compared(col=COL, row=ROW))) == []


# ------------------------------------------------------------------------------------------------ Table 1

FAST_IMPACT = {"seq_len": 64, "n_windows": 4, "tasks": [], "limit": 8}


def unigram_everywhere(corpus_file: Path) -> torch.nn.Module:
    """The everywhere plant whose super activation predicts the corpus's byte frequencies (a unigram model) and
    whose residual without it predicts nothing (uniform): it relies on the super activation at every position."""
    model = tiny_model("llama")
    plant_everywhere(model)
    counts = Counter(TOKENIZER(corpus_file.read_text(), add_special_tokens=False)["input_ids"])
    logp = torch.tensor([math.log(counts.get(i, 0) + 1) for i in range(len(TOKENIZER))])
    set_unembedding(model, sa=(logp - logp.mean()) / math.sqrt(ArchitectureAdapter(model).hidden_size))
    return model


@pytest.mark.counterexample("superweight_pruning_hurts_far_more_than_others.perplexity_ratio_sw_over_others")
def test_sw_over_others_gate_fails_when_the_model_does_not_rely_on_its_super_weight(entries, corpus_file) -> None:
    """A super weight whose super activation sits on BOS, where the random model never reads it: pruning it
    costs about as much as pruning as many other large weights (ratio below 2, not 10)."""
    comparisons = gate(entries, "superweight_pruning_hurts_far_more_than_others", context_for(bos_planted(), corpus_file),
                       **FAST_IMPACT)
    assert failed(comparisons) == ["perplexity_ratio_sw_over_others"]
    assert comparisons[0].measured < 2  # pruning a super activation nobody reads changes little


@pytest.mark.counterexample("superweight_restoring_the_super_activation_recovers.restore_recovery")
def test_restore_gate_fails_when_the_super_weight_acts_at_every_position(entries, corpus_file) -> None:
    """A model that predicts through its super activation at every position (a unigram predictor): pruning does
    real damage, and restoring the activation at one position per sequence gives back under a tenth of it."""
    # Restoring the super activation where it peaks in each sequence gives back one position of many.
    context = context_for(unigram_everywhere(corpus_file), corpus_file, "unigram")
    name = "superweight_restoring_the_super_activation_recovers"
    assert failed(gate(entries, name, context, **FAST_IMPACT)) == ["restore_recovery"]
    metrics = measure(entries, name, context, **FAST_IMPACT)  # the same artifact: measured once
    assert metrics["perplexity_ratio_prune_sw"] > 3  # the damage is real: the gate fails on recovery, not on 0/0
    assert metrics["restore_recovery"] < 0.1


def test_restore_puts_back_the_clean_value_at_each_sequence_peak_only(corpus_file) -> None:
    from lmaudit.checks.core.hooks import capture
    from lmaudit.checks.core.interventions import prune_and_restore

    model = unigram_everywhere(corpus_file)
    adapter = ArchitectureAdapter(model)
    bos = TOKENIZER.bos_token_id
    ids = torch.tensor([[bos, *token_ids("a", "b", "c")], [bos, *token_ids("x", "y", "z")]])
    down = {"down": adapter.down_proj(1)}
    with capture(down, what="output") as clean, torch.no_grad():
        model(input_ids=ids)
    with prune_and_restore(adapter, [(1, ROW, COL)]), capture(down, what="output") as edited, torch.no_grad():
        model(input_ids=ids)
    y, y_edit = clean.output("down")[..., ROW], edited.output("down")[..., ROW]
    peak = y.abs().argmax(dim=-1)
    rows = torch.arange(len(ids))
    assert torch.allclose(y_edit[rows, peak], y[rows, peak], rtol=1e-5)
    others = torch.ones_like(y, dtype=torch.bool)
    others[rows, peak] = False
    assert y_edit[others].abs().max() < 1e-3 * y[others].abs().min()  # pruned everywhere else


def mc_task(tmp_path: Path, n_docs: int = 6) -> ZeroShotTask:
    """Two-way multiple choice, answer "a" (gold 0) against "b", over a local JSONL."""
    import json

    path = tmp_path / "ab.jsonl"
    rows = [{"query": f"Question {i}: pick one.", "choices": ["a", "b"], "gold": 0} for i in range(n_docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": "lmaudit_test_ab", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
              "test_split": "test", "num_fewshot": 0, "metadata": {"version": 1.0}, "output_type": "multiple_choice",
              "doc_to_text": "{{query}}", "doc_to_target": "gold", "doc_to_choice": "choices",
              "target_delimiter": "", "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return ZeroShotTask("ab", config)


@pytest.mark.counterexample("superweight_pruning_drops_accuracy.accuracy_drop_p_value")
def test_accuracy_gate_fails_when_pruning_breaks_no_document(entries, corpus_file) -> None:
    """A random tiny model gets the arithmetic documents wrong with or without its (BOS-only) super weight: no
    document breaks, so the sign test has nothing to reject."""
    # A random tiny model answers the arithmetic task wrongly with or without its super weight: nothing breaks.
    comparisons = gate(entries, "superweight_pruning_drops_accuracy", context_for(bos_planted(), corpus_file),
                       **{**FAST_IMPACT, "tasks": ["arithmetic"], "limit": 6})
    assert failed(comparisons) == ["accuracy_drop_p_value"]


def test_accuracy_gate_passes_when_the_answer_needs_the_super_activation(corpus_file, tmp_path) -> None:
    from lmaudit.checks.superweights.impact import superweight_impact

    model = tiny_model("llama")
    plant_everywhere(model)
    a, b = token_ids("a", "b")
    sa, dc = torch.zeros(len(TOKENIZER)), torch.zeros(len(TOKENIZER))
    sa[a], dc[b] = 1.0, 1.0  # with the super activation (which dominates) the model answers "a"; without, "b"
    set_unembedding(model, sa=sa, dc=dc)
    impact = superweight_impact(loaded(model, "needs-sa"), detect(loaded(model, "needs-sa")),
                                Corpus("test", TEXT, "test"), tasks=[mc_task(tmp_path)], seq_len=64, n_windows=2,
                                limit=6)
    assert impact.n_broken_prune_sw == 6 and impact.accuracy_drop_p_value < 0.05


# ------------------------------------------------------------------------------------------------ stopwords


def stopword_model(*, sa_says_stopwords: bool) -> torch.nn.Module:
    """The everywhere plant predicting stopword tokens ("a", "i") with its super activation, or without it."""
    model = tiny_model("llama")
    plant_everywhere(model)
    boost = torch.zeros(len(TOKENIZER))
    boost[token_ids("a", "i", "A", "I")] = 3.0
    set_unembedding(model, **({"sa": boost} if sa_says_stopwords else {"dc": boost}))
    return model


@pytest.mark.counterexample("superweight_pruning_raises_stopwords.stopword_mass_ratio")
def test_stopword_gate_fails_when_the_super_weight_promotes_stopwords(entries, corpus_file) -> None:
    """A super activation that predicts stopwords itself: pruning it lowers their probability (ratio below 1);
    one that suppresses them (they are predicted without it) passes."""
    fast = {"n_prompts": 8, "prompt_tokens": 16}
    context = context_for(stopword_model(sa_says_stopwords=True), corpus_file, "sa-stopwords")
    assert failed(gate(entries, "superweight_pruning_raises_stopwords", context, **fast)) == ["stopword_mass_ratio"]
    context = context_for(stopword_model(sa_says_stopwords=False), corpus_file, "sa-suppresses")
    assert failed(gate(entries, "superweight_pruning_raises_stopwords", context, **fast)) == []


# ------------------------------------------------------------------------------------------------ scaling


@pytest.mark.counterexample("superweight_scaled_to_zero_is_catastrophic.perplexity_ratio_at_0")
def test_scale_zero_gate_fails_when_the_model_does_not_rely_on_its_super_weight(entries, corpus_file) -> None:
    """Scaling to 0 a BOS-only super weight that the model never reads leaves its perplexity as it was; the
    unigram predictor that relies on it everywhere passes."""
    fast = {"scales": [0.0, 1.0, 2.0], "tasks": [], "seq_len": 64, "n_windows": 2}
    comparisons = gate(entries, "superweight_scaled_to_zero_is_catastrophic", context_for(bos_planted(), corpus_file),
                       **fast)
    assert failed(comparisons) == ["perplexity_ratio_at_0"]
    comparisons = gate(entries, "superweight_scaled_to_zero_is_catastrophic",
                       context_for(unigram_everywhere(corpus_file), corpus_file, "unigram"), **fast)
    assert failed(comparisons) == []


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[LoadedModel, ZeroShotTask]]:
    """The everywhere plant with a small super activation that, against the DC channel, just decides "a" over
    "b": amplified by 1.5 or more it tips the answer to "b"."""
    model = tiny_model("llama")
    plant_everywhere(model, weight=3e-4)
    task = mc_task(tmp_path)
    a, b = token_ids("a", "b")
    query = TOKENIZER("Question 0: pick one.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[TOKENIZER.bos_token_id, *query]])
    with torch.no_grad():
        final = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]  # after the final norm
    n_dc, n_sa = float(final[DC]), float(final[ROW])
    w_u = ArchitectureAdapter(model).unembedding.weight
    with torch.no_grad():
        w_u[[a, b]] = 0.0
        w_u[a, DC] = 1.0 / n_dc
        w_u[b, ROW] = 1.0 / (1.25 * n_sa)  # "a" wins while the super activation is below 1.25 times its size
    yield loaded(model, "balanced"), task


@pytest.mark.counterexample("superweight_amplifying_does_not_hurt.best_amplified_accuracy_gain")
def test_amplification_gate_fails_when_amplifying_tips_the_answers(entries, balanced) -> None:
    """A super activation that only just decides "a" over "b": amplified 1.5 times or more, it tips every answer
    to "b", so the best amplified accuracy is 1 below the accuracy at scale 1."""
    model, task = balanced
    detection = detect(model)
    assert detection.coordinates == [(1, ROW, COL)], detection.why_none()
    scaling = superweight_scaling(model, detection, Corpus("test", TEXT, "test"), scales=[0.0, 1.0, 1.5, 2.0],
                                  tasks=[task], seq_len=64, n_windows=2, limit=6)
    threshold = entries["superweight_amplifying_does_not_hurt"].resolve("full").expect["best_amplified_accuracy_gain"]
    metrics = scaling.metrics()
    assert metrics["accuracy_at_1"] == 1.0 and metrics["best_amplified_accuracy_gain"] == -1.0
    assert not compare("best_amplified_accuracy_gain", metrics["best_amplified_accuracy_gain"], threshold).passed
