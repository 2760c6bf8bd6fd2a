"""Model specs resolve to the right loader, with clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmaudit.checks.core.loading as loading
from lmaudit.checks.core.errors import ModelLoadError
from lmaudit.checks.core.hashing import state_dict_sha256
from lmaudit.checks.core.loading import ALIASES, DEFAULT_MODEL, LoadedModel, cache_root, load_model
from tests.checkpoints import save_tiny_gguf, save_tiny_llama
from tests.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online as far as the loader knows, and any hub lookup fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def hub(*args: object, **kwargs: object) -> None:
        raise AssertionError("a path-like spec reached the hub loader")

    monkeypatch.setattr(loading, "_load_hub", hub)


@pytest.mark.parametrize("spec", ["models/nope", "x.gguf", "./nope", "~/nope-lmaudit-test", "a/b/c.gguf"])
def test_missing_path_like_spec_is_no_such_file_never_a_hub_id(spec: str, no_hub: None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = Path(spec).expanduser().resolve()
    with pytest.raises(ModelLoadError, match=re.escape(f"no such file or directory: {spec} (resolved to {resolved})")):
        load_model(spec)


def test_missing_org_name_path_says_how_to_ask_the_hub(no_hub: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=re.escape("write hf:some-org/some-model")):
        load_model("some-org/some-model")


def test_absolute_missing_path_is_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "nope" / "model"))


def test_offline_hub_id_says_so_and_how_to_pass_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty HF cache
    with pytest.raises(ModelLoadError, match="offline.*local directory"):
        load_model("hf:some-org/some-model-that-is-not-cached")


def test_malformed_hub_id_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="hf:org/name"):
        load_model("hf:just-a-name")


# ------------------------------------------------------------------------------------------------ content hash


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMAUDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_same_weights_hash_the_same_however_they_are_given(cache: Path, tmp_path: Path) -> None:
    gguf_file = save_tiny_gguf(tmp_path / "tiny.gguf")
    from_gguf = load_model(str(gguf_file))
    converted = Path(from_gguf.cache_entry or "")
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    from_dir = load_model(str(converted))
    from_copy = load_model(str(copy))
    from_folder = load_model(str(gguf_file.parent))  # a directory holding exactly one .gguf file
    in_memory = LoadedModel.from_model(from_dir.model, from_dir.tokenizer)
    hashes = {from_gguf.content_hash, from_dir.content_hash, from_copy.content_hash, from_folder.content_hash,
              in_memory.content_hash}
    assert len(hashes) == 1 and len(from_gguf.content_hash) == 64
    assert from_gguf.source_sha256 == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    assert from_gguf.card()["source_sha256"] == from_gguf.source_sha256 != from_gguf.content_hash
    assert from_dir.source_sha256 is None and from_dir.cache_entry is None


def test_a_changed_weight_changes_the_hash(tiny_dir: Path, tmp_path: Path) -> None:
    original = load_model(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    changed_dir = tmp_path / "changed"
    model.save_pretrained(changed_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, changed_dir / name)
    assert load_model(str(changed_dir)).content_hash != original.content_hash
    assert load_model(str(tiny_dir), dtype="bfloat16").content_hash != original.content_hash  # what is loaded


def test_content_hash_definition_counts_tied_tensors_once() -> None:
    model = tiny_model("gpt2")  # ties lm_head.weight to transformer.wte.weight
    tensors = model.state_dict()
    assert tensors["lm_head.weight"].data_ptr() == tensors["transformer.wte.weight"].data_ptr()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if name == "transformer.wte.weight":  # tied: already hashed as lm_head.weight, the earlier name
            continue
        value = tensors[name].contiguous()
        header = f"{name}\0{str(value.dtype).removeprefix('torch.')}\0{tuple(value.shape)}\0{value.nbytes}\n"
        digest.update(header.encode() + value.numpy().tobytes())
    assert state_dict_sha256(model) == digest.hexdigest()


# ------------------------------------------------------------------------------------------- device placement


def test_device_map_with_a_layer_on_disk_is_recorded_and_hashes_like_memory(tiny_dir: Path, cache: Path,
                                                                            tmp_path: Path) -> None:
    plain = load_model(str(tiny_dir))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(device_map))
    for given in (device_map, str(map_file)):
        offloaded = load_model(str(tiny_dir), device_map=given)
        card = offloaded.card()
        assert card["layer_devices"] == ["cpu", "disk"] and card["device"] == "device_map"
        assert card["device_map"] == device_map
        assert offloaded.content_hash == plain.content_hash
        ids = torch.tensor([[256, 72, 105, 33]])
        assert torch.allclose(offloaded.model(ids).logits, plain.model(ids).logits, atol=1e-6)
    assert load_model(str(tiny_dir), device_map="auto").card()["layer_devices"] == ["cpu", "cpu"]
    assert plain.card()["layer_devices"] == ["cpu", "cpu"] and plain.card()["device"] == "cpu"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "gpu"}, "'gpu' is not a torch device"),
    ({"device": "meta"}, "device type 'meta' is not one of"),
    ({"device": 3.5}, "device must be a device name"),
    ({"device_map": "nonsense"}, "neither one of auto, balanced"),
    ({"device_map": "missing-map.json"}, "device_map: no such file: missing-map.json"),
    ({"device_map": {"model.layers.0": "tpu"}}, r"device_map\['model.layers.0'\] 'tpu' is not a torch device"),
    ({"device_map": ["cpu"]}, "must map module names to devices"),
    ({"device_map": "auto", "device": "cuda"}, "not both"),
])
def test_bad_placement_is_refused_before_anything_loads(kwargs: dict[str, object], message: str, cache: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    gguf_file = save_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(gguf_file), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=message):  # checked before the spec, too
        load_model("models/nope", **kwargs)  # type: ignore[arg-type]
    assert not cache.exists()  # nothing was converted


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_device_without_a_gpu_is_refused(tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no cuda device"):
        load_model(str(tiny_dir), device="cuda:0")


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
    entry = cache_root() / "gguf" / (first.source_sha256 or "")
    assert first.cache_entry == str(entry)
    assert (entry / "model.safetensors").is_file() and (entry / "config.json").is_file()
    assert "quantization_config" not in (entry / "config.json").read_text()
    second = load_model(DEFAULT_MODEL)
    assert second.cache_hit is True
    assert second.load_seconds < 3.0, f"warm load took {second.load_seconds:.2f} s (budget 3 s)"
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
