"""Model specs resolve to the right loader, with clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmaudit.checks.core.errors import ModelLoadError
from lmaudit.checks.core.loading import ALIASES, DEFAULT_MODEL, cache_root, load_model
from tests.checkpoints import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def test_local_hf_directory_loads_in_eval_mode_with_hash(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir))
    assert loaded.kind == "hf-dir"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert len(loaded.content_hash) == 64
    assert loaded.card()["parameters"] == sum(p.numel() for p in loaded.model.parameters())


def test_bfloat16_on_request(tiny_dir: Path) -> None:
    assert next(load_model(str(tiny_dir), dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


def test_unknown_dtype_is_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="float32, bfloat16"):
        load_model(str(tiny_dir), dtype="float8")


def test_unknown_model_suggests_an_alias() -> None:
    with pytest.raises(ModelLoadError, match="Did you mean: smollm2-135m-instruct"):
        load_model("smollm2-135m-instrct")


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(str(tmp_path / "nope" / "model"))


def test_offline_hub_id_says_so_and_how_to_pass_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache
    with pytest.raises(ModelLoadError, match="offline.*local directory"):
        load_model("some-org/some-model-that-is-not-cached")


def test_pickle_only_directory_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (unsafe / f.name).write_bytes(f.read_bytes())
    (unsafe / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="only from safetensors or GGUF"):
        load_model(str(unsafe))


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(f))


@pytest.mark.slow
def test_default_gguf_is_cached_as_safetensors_keyed_by_hash() -> None:
    alias = ALIASES[DEFAULT_MODEL]
    if alias.path() is None:
        pytest.skip(f"default model not installed ({alias.install})")
    first = load_model(DEFAULT_MODEL)
    entry = cache_root() / "gguf" / first.content_hash
    assert (entry / "model.safetensors").is_file() and (entry / "config.json").is_file()
    assert "quantization_config" not in (entry / "config.json").read_text()
    second = load_model(DEFAULT_MODEL)
    assert second.cache_hit is True
    assert second.load_seconds < 3.0, f"warm load took {second.load_seconds:.2f} s (budget 3 s)"
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
