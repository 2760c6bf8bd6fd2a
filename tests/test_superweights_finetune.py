"""The offline LoRA fine-tune: seeded, cached atomically, merged into a copy (the base model is untouched)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.finetune import LoraRecipe, finetune_dir, lora_finetune
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.superweights.detect import detect
from lmaudit.checks.superweights.invariance import finetune_invariance
from tests.checkpoints import byte_tokenizer
from tests.test_superweights import plant_super_weight
from tests.tiny_models import tiny_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMAUDIT_CACHE", str(tmp_path))
    return tmp_path


def planted() -> LoadedModel:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    model.requires_grad_(False)
    return LoadedModel(spec="tiny-planted", source="memory", kind="memory", model=model, tokenizer=byte_tokenizer(),
                       dtype="float32", content_hash="tiny-planted-v1", load_seconds=0.0)


def test_lora_finetune_is_seeded_cached_and_leaves_the_base_alone(cache: Path) -> None:
    base = planted()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    tuned = lora_finetune(base, steps=2, seed=0, batch_size=4)
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert tuned.cache_hit is False and tuned.kind == "finetune"
    directory = finetune_dir(base, LoraRecipe(steps=2, seed=0, batch_size=4))
    assert (directory / "recipe.json").is_file()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    changed = [k for k, v in tuned.model.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert any("down_proj" in k for k in changed)  # the MLP down projections are tuned too

    again = lora_finetune(base, steps=2, seed=0, batch_size=4)
    assert again.cache_hit is True
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    fresh = lora_finetune(base, steps=2, seed=0, batch_size=4, use_cache=False)  # same seed, same weights
    assert all(torch.allclose(v, fresh.model.state_dict()[k], atol=1e-6) for k, v in tuned.model.state_dict().items())
    other = lora_finetune(base, steps=2, seed=1, batch_size=4)
    assert other.extras["recipe_key"] != tuned.extras["recipe_key"]


def test_planted_super_weight_survives_the_fine_tune(cache: Path) -> None:
    base = planted()
    # A gentle fine-tune: the planted column of W_down is exactly 0 off the super weight and x[BOS, 17] is ~3000,
    # so any LoRA delta there of more than ~1e-3 would itself write a 50x-median spike into another channel.
    tuned = lora_finetune(base, steps=2, seed=0, batch_size=4, lr=2e-5)
    reference = detect(base, "plant")
    result = finetune_invariance(base, reference, tuned, source="lora")
    assert result.metrics()["same_coordinates"] is True, result.tuned.labels()
    change = result.changes[0]
    assert (change.layer, change.row, change.col) == (1, 5, 17)
    assert change.tuned != change.base  # LoRA touched it, a little


def test_bad_recipe_fails_before_training(cache: Path) -> None:
    with pytest.raises(LmAuditError):
        lora_finetune(planted(), steps=0)
