"""The conditions of Table 1 and the zero-shot BOS policy on tiny models: every edit restores the model bit for bit,
the "others" are the largest weights but the super weights, lm-eval documents start with BOS exactly once, and a
model without a confirmed super weight makes every dependent check skip with the detection's reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.core.corpora import Corpus
from lmaudit.checks.core.errors import DataUnavailableError, PremiseMissing
from lmaudit.checks.core.interventions import prune_and_restore
from lmaudit.checks.core.zero_shot import bos_policy_lm, zero_shot_tasks
from lmaudit.checks.harness.context import AuditContext
from lmaudit.checks.superweights.checks import (
    FinetuneInvarianceParams,
    ImpactParams,
    PromptInvarianceParams,
    ScalingParams,
    StopwordParams,
    finetune_invariance_audit,
    prompt_invariance_audit,
    scaling_audit,
    stopword_audit,
    superweight_impact_audit,
)
from lmaudit.checks.superweights.conditions import (
    PAPER_OTHERS_SHARE,
    largest_other_weights,
    others_count,
)
from lmaudit.checks.superweights.detect import detect
from lmaudit.checks.superweights.impact import superweight_impact
from tests.test_superweights import TOKENIZER, loaded, planted_llama
from tests.tiny_models import assert_bit_identical, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "A small corpus for tiny models, long enough for a few windows of bytes. " * 30


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_prune_and_restore_leaves_the_model_bit_identical() -> None:
    model = planted_llama()
    before = snapshot(model)
    with prune_and_restore(ArchitectureAdapter(model), [(1, 5, 17)]), torch.no_grad():
        model(input_ids=torch.tensor([[TOKENIZER.bos_token_id, 65, 66]]))
    assert_bit_identical(model, before)


def test_others_are_the_largest_weights_except_the_super_weights() -> None:
    adapter = ArchitectureAdapter(planted_llama())
    chosen = largest_other_weights(adapter, 5, [(1, 5, 17)])
    picked = [(m, int(r), int(c)) for m, (rows, cols) in chosen.items() for r, c in zip(rows, cols, strict=True)]
    assert len(picked) == 5 and (adapter.down_proj(1), 5, 17) not in picked
    smallest = min(abs(float(adapter.weight(m)[r, c].detach())) for m, r, c in picked)
    for module in adapter.decoder_linears().values():  # nothing left out is larger, but the super weight
        w = adapter.weight(module).detach().abs().clone()
        w[[r for m, r, _ in picked if m is module], [c for m, _, c in picked if m is module]] = 0
        if module is adapter.down_proj(1):
            w[5, 17] = 0
        assert float(w.max()) <= smallest


def test_others_count_is_a_share_of_the_parameters() -> None:
    adapter = ArchitectureAdapter(planted_llama())
    assert others_count(adapter, PAPER_OTHERS_SHARE) == 1  # a tiny model: at least one
    assert others_count(adapter, 1e-3) == round(1e-3 * adapter.parameter_count)


def test_lm_eval_documents_get_the_bos_policy() -> None:
    lm = bos_policy_lm(loaded(tiny_model("llama")))
    bos = TOKENIZER.bos_token_id
    assert lm.tok_encode("3+4=")[0] == bos and lm.tok_encode("3+4=").count(bos) == 1
    assert bos not in lm.tok_encode("7", add_special_tokens=False)  # a continuation after lm-eval's own prefix
    from lm_eval.models.huggingface import HFLM

    stock = HFLM(pretrained=tiny_model("llama"), tokenizer=TOKENIZER, add_bos_token=True, device="cpu")
    assert bos not in stock.tok_encode("3+4=")  # why the wrapper exists: this tokenizer adds no special tokens


def test_accuracy_conditions_must_hold_the_pair_compared() -> None:
    model = loaded(planted_llama())
    tasks, _ = zero_shot_tasks(["arithmetic"])
    with pytest.raises(ValueError, match="original and prune_sw"):
        superweight_impact(model, detect(model), Corpus("t", TEXT, "t"), tasks=tasks, accuracy_conditions=["original"])


def test_accuracy_checks_skip_when_no_task_data_is_here(corpus_file, monkeypatch) -> None:
    monkeypatch.setattr("lmaudit.checks.core.zero_shot.shared_data_dir", lambda: None)
    context = AuditContext(model=loaded(planted_llama()), corpus_path=str(corpus_file))
    with pytest.raises(DataUnavailableError, match="piqa"):
        superweight_impact_audit(context, ImpactParams(tasks=["piqa"], accuracy_conditions=["original", "prune_sw"]))
    with pytest.raises(DataUnavailableError, match="arc_easy"):
        scaling_audit(context, ScalingParams(tasks=["arc_easy"]))


def test_every_dependent_check_skips_with_the_detection_reason(corpus_file, monkeypatch) -> None:
    def no_finetune(*args: object, **kwargs: object) -> None:
        raise AssertionError("no fine-tune may run when there is no super weight to compare")

    context = AuditContext(model=loaded(tiny_model("llama"), "unplanted"), corpus_path=str(corpus_file))
    monkeypatch.setattr(context, "finetuned", no_finetune)
    checks = [(superweight_impact_audit, ImpactParams(n_windows=2, seq_len=32)),
              (stopword_audit, StopwordParams(n_prompts=2, prompt_tokens=8)),
              (scaling_audit, ScalingParams(n_windows=2, seq_len=32)),
              (prompt_invariance_audit, PromptInvarianceParams(prompts=["a", "b"])),
              (finetune_invariance_audit, FinetuneInvarianceParams())]
    for check, params in checks:
        with pytest.raises(PremiseMissing, match="no confirmed super weight: no layer spiked"):
            check(context, params)


def test_checks_share_each_edit_measured_once(corpus_file) -> None:
    from lmaudit.checks.core.zero_shot import ScoreBook
    from lmaudit.checks.superweights.conditions import WindowCache

    context = AuditContext(model=loaded(planted_llama()), corpus_path=str(corpus_file))
    fast = {"seq_len": 32, "n_windows": 2, "tasks": ["arithmetic"], "limit": 3}
    superweight_impact_audit(context, ImpactParams(**fast, accuracy_conditions=["original", "prune_sw"]))
    scaling_audit(context, ScalingParams(**fast, scales=[0.0, 1.0, 2.0]))
    books = [v for (kind, _), v in context.artifacts._store.items() if kind is ScoreBook]
    windows = [v for (kind, _), v in context.artifacts._store.items() if kind is WindowCache]
    assert len(books) == 1 and sorted(books[0]._scores) == ["prune_sw", "scale=2", "unedited"]  # 3, not 5
    assert len(windows) == 1 and "scale=2" in windows[0]._perplexity and "prune_sw" in windows[0]._perplexity
