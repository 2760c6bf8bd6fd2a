"""Interventions and weight reads on models that accelerate spreads over the CPU and the disk.

Three copies of the same tiny weights: ``plain`` (an ordinary model), ``disk`` (``from_pretrained`` with a
``device_map`` that keeps some layers on ``"cpu"`` and sends others, the embedding and the unembedding to
``"disk"``: accelerate then reads those weights straight from the checkpoint's safetensors file) and ``ram``
(accelerate's ``cpu_offload`` on one layer, its weights in a RAM state dict, and ``disk_offload`` on another,
memory-mapped ``.dat`` files). On this CPU-only machine the ``"cpu"`` entries of a device map are the main device
and stay resident, so ``ram`` builds accelerate's RAM offload with its public functions instead.

Every intervention must give the offloaded model the logits it gives the plain one, leave every stored value,
every file and every accelerate hook as it was, and leave no torch hook behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmaudit.checks.core import devices
from lmaudit.checks.core.adapter import ArchitectureAdapter, placement
from lmaudit.checks.core.devices import (
    DeviceError,
    OffloadError,
    is_offloaded,
    read_tensor,
    resolve_device,
    resolve_device_map,
)
from lmaudit.checks.core.interventions import (
    ablate_heads,
    edit_down_proj_weights,
    edit_weight,
    replace_activation,
    scale_heads_per_row,
    scale_neurons,
    set_down_proj_weight,
    transform_inputs,
    transform_weights,
    zero_weights,
)
from lmaudit.checks.core.layer_skip import clean_hidden_states, start_at_layer
from lmaudit.checks.core.loading import LoadedModel
from lmaudit.checks.superweights.detect import detect
from tests.checkpoints import byte_tokenizer
from tests.strategies_interventions import InterventionSpec, interventions_for
from tests.test_superweights import PLANT_PROMPT, plant_super_weight
from tests.tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 6
IDS = random_ids(2, SEQ_LEN)


class Boom(Exception):
    pass


# ------------------------------------------------------------------------------------------------ fixtures


def save(model: PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def device_map(model: PreTrainedModel, layers: dict[int, str], *, rest: str = "cpu",
               on_disk: tuple[str, ...] = ()) -> dict[str, str]:
    """Each decoder layer where ``layers`` says (default ``"cpu"``); every other module with a tensor on
    ``rest``, except the modules named in ``on_disk``."""
    adapter = ArchitectureAdapter(model)
    names = [f"{adapter.layers_path}.{i}" for i in range(adapter.n_layers)]
    out = {name: layers.get(i, "cpu") for i, name in enumerate(names)}
    tensors = [*model.state_dict(), *(name for name, _ in model.named_buffers())]
    for tensor in tensors:
        module = tensor.rpartition(".")[0]
        if not any(module == n or module.startswith(f"{n}.") for n in names):
            out[module] = "disk" if module in on_disk else rest
    return out


@dataclass
class Copies:
    """The same weights loaded plainly and offloaded, with what must never change on disk."""

    kind: str  # "disk": from_pretrained with a device map; "ram": cpu_offload + disk_offload
    arch: str
    plain: PreTrainedModel
    offloaded: PreTrainedModel
    files: Path  # the checkpoint and the offload folder

    def __post_init__(self) -> None:
        clean_hidden_states(self.offloaded, IDS)  # transformers installs its output-recording hooks once, here
        self.adapter = ArchitectureAdapter(self.offloaded)
        self.plain_adapter = ArchitectureAdapter(self.plain)
        self.stored = stored_values(self.offloaded)
        self.maps = weight_maps(self.offloaded)
        self.hashes = file_hashes(self.files)
        self.torch_hooks = torch_hook_count(self.offloaded)
        self.clean = logits(self.offloaded, IDS)

    def assert_untouched(self) -> None:
        """Stored values bit for bit, each accelerate hook's own weights map, offloaded parameters still meta,
        every file byte for byte, no torch hook left, and the clean logits again."""
        after = stored_values(self.offloaded)
        assert after.keys() == self.stored.keys()
        for key, value in self.stored.items():
            assert torch.equal(after[key].view(torch.int32), value.view(torch.int32)), f"{key} changed"
        assert weight_maps(self.offloaded) == self.maps, "an accelerate hook kept an edited weights map"
        for module in self.offloaded.modules():
            if is_offloaded(module):
                assert module.weight.is_meta, f"{devices.module_label(module)} left materialized"
        assert file_hashes(self.files) == self.hashes
        assert torch_hook_count(self.offloaded) == self.torch_hooks
        assert torch.equal(logits(self.offloaded, IDS), self.clean)


def stored_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's real values, resident or offloaded (``state_dict`` only has meta tensors for these)."""
    return {f"{name}.{tensor_name}": read_tensor(module, tensor_name).detach().clone()
            for name, module in model.named_modules()
            for tensor_name, _ in module.named_parameters(recurse=False)}


def weight_maps(model: nn.Module) -> dict[str, int]:
    return {name: id(module._hf_hook.weights_map) for name, module in model.named_modules()
            if is_offloaded(module)}


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def torch_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def load_disk_offloaded(directory: Path, offload: Path, *, arch: str) -> PreTrainedModel:
    """Layer 0 on "cpu", layers 1 and 2 on "disk"; the embedding and (untied) unembedding on "disk" too."""
    plain = AutoModelForCausalLM.from_pretrained(directory)
    ends = ("model.embed_tokens", "lm_head") if arch != "gpt2" else ("transformer.wpe",)
    dmap = device_map(plain, {1: "disk", 2: "disk"}, on_disk=ends)
    return AutoModelForCausalLM.from_pretrained(directory, device_map=dmap, offload_folder=str(offload)).eval()


def ram_and_disk_offloaded(directory: Path, offload: Path) -> PreTrainedModel:
    """Layer 1 offloaded to RAM (``cpu_offload``), layer 2 to ``.dat`` files (``disk_offload``)."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    layers = ArchitectureAdapter(model).layer_list
    cpu_offload(layers[1], execution_device=torch.device("cpu"))
    disk_offload(layers[2], str(offload), execution_device=torch.device("cpu"))
    return model


@pytest.fixture(scope="module", params=[("disk", "llama"), ("disk", "gpt2"), ("ram", "llama")],
                ids=lambda p: "-".join(p))
def copies(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Copies:
    kind, arch = request.param
    root = tmp_path_factory.mktemp(f"offload-{kind}-{arch}")
    directory = save(tiny_model(arch), root / "checkpoint")
    offloaded = (load_disk_offloaded(directory, root / "offload", arch=arch) if kind == "disk"
                 else ram_and_disk_offloaded(directory, root / "offload"))
    return Copies(kind, arch, AutoModelForCausalLM.from_pretrained(directory).eval(), offloaded, root)


# ------------------------------------------------------------------------------------------------ the setup itself


def test_the_fixtures_offload_what_they_say(copies: Copies) -> None:
    adapter = copies.adapter
    assert [is_offloaded(adapter.down_proj(i)) for i in range(3)] == [False, True, True]
    assert adapter.down_proj(1).weight.is_meta
    if copies.kind == "disk":
        assert adapter.embedding.weight.is_meta == (copies.arch == "llama")  # GPT-2 ties it: kept resident
    else:
        assert any((copies.files / "offload").glob("*.dat"))  # disk_offload's memory-mapped files
    assert torch.equal(copies.clean, logits(copies.plain, IDS))


def test_placement_from_the_device_map_and_from_the_parameters(copies: Copies) -> None:
    path = copies.adapter.layers_path
    # "ram" has no hf_device_map: placement is read off the hooks (layer 1's weights sit in a RAM state dict)
    expected = ["cpu", "disk", "disk"] if copies.kind == "disk" else ["cpu", "cpu", "disk"]
    assert placement(copies.offloaded) == {f"{path}.{i}": where for i, where in enumerate(expected)}
    assert set(placement(copies.plain).values()) == {"cpu"}


def test_placement_of_a_layer_split_over_devices() -> None:
    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1.self_attn": 0,
                           "model.layers.1.mlp": "cpu", "model.layers.1.input_layernorm": "cpu",
                           "model.layers.1.post_attention_layernorm": "cpu", "model.layers.2": "disk",
                           "model.norm": "disk", "lm_head": "disk"}
    assert placement(model) == {"model.layers.0": "cuda:0", "model.layers.1": "cuda:0, cpu",
                                "model.layers.2": "disk"}
    model.hf_device_map = {"": "mps"}
    assert set(placement(model).values()) == {"mps"}


# ------------------------------------------------------------------------------------------------ reading weights


def test_the_adapter_reads_real_values_of_offloaded_weights(copies: Copies) -> None:
    adapter, plain = copies.adapter, copies.plain_adapter
    for layer in range(adapter.n_layers):
        assert torch.equal(adapter.down_proj_weight(layer), plain.down_proj_weight(layer))
        assert torch.equal(adapter.weight(adapter.attn_out(layer)), plain.weight(plain.attn_out(layer)))
    assert adapter.device == torch.device("cpu")  # also when the embedding itself is offloaded (meta)
    assert adapter.tied_embeddings == plain.tied_embeddings
    assert adapter.intermediate_size == plain.intermediate_size


def test_a_meta_weight_without_its_own_hook_is_refused_naming_the_module() -> None:
    module = nn.Linear(4, 3, device="meta")
    with pytest.raises(OffloadError, match=r"Linear with weight \(3, 4\): weight is on the meta device"):
        read_tensor(module)
    with pytest.raises(OffloadError, match="Linear"), edit_weight(module, (0, 0), value=1.0):
        pass
    with pytest.raises(OffloadError, match="Linear"), transform_weights([module], lambda o, w: w.zero_()):
        pass


# ------------------------------------------------------------------------------------------------ weight edits


def test_set_weight_in_an_offloaded_layer_is_seen_and_undone(copies: Copies) -> None:
    adapter = copies.adapter
    with set_down_proj_weight(adapter, 2, 3, 5, value=1e3) as original:
        assert adapter.down_proj_weight(2)[3, 5].item() == 1e3
        with set_down_proj_weight(copies.plain_adapter, 2, 3, 5, value=1e3):
            assert torch.equal(logits(copies.offloaded, IDS), logits(copies.plain, IDS))
        assert not torch.equal(logits(copies.offloaded, IDS), copies.clean)
    assert original == copies.plain_adapter.down_proj_weight(2)[3, 5].item()
    copies.assert_untouched()


def test_an_offloaded_edit_is_undone_when_the_body_raises(copies: Copies) -> None:
    with pytest.raises(Boom), edit_down_proj_weights(copies.adapter, [(1, 0, 0), (2, 4, 9), (2, 4, 9)],
                                                     scale=-3.0):
        logits(copies.offloaded, IDS)
        raise Boom
    copies.assert_untouched()


def test_offloaded_edits_exiting_out_of_order_still_restore(copies: Copies) -> None:
    adapter = copies.adapter
    outer = set_down_proj_weight(adapter, 1, 0, 1, value=5.0)
    inner = set_down_proj_weight(adapter, 1, 0, 2, value=7.0)
    outer.__enter__()
    inner.__enter__()
    assert adapter.down_proj_weight(1)[0, 1:3].tolist() == [5.0, 7.0]
    outer.__exit__(None, None, None)
    assert adapter.down_proj_weight(1)[0, 2].item() == 7.0
    assert adapter.down_proj_weight(1)[0, 1].item() == copies.plain_adapter.down_proj_weight(1)[0, 1].item()
    inner.__exit__(None, None, None)
    copies.assert_untouched()


def test_transform_weights_runs_write_once_per_module_and_never_writes_the_store(copies: Copies) -> None:
    calls: list[tuple[int, ...]] = []

    def halve(original: torch.Tensor, weight: torch.Tensor) -> None:
        calls.append(tuple(weight.shape))
        assert torch.equal(original, weight) and original.data_ptr() != weight.data_ptr()
        weight.copy_(original / 2)

    modules = copies.adapter.decoder_linears()
    with transform_weights(modules, halve):
        first = logits(copies.offloaded, IDS)
        assert torch.equal(logits(copies.offloaded, IDS), first)
        assert torch.equal(copies.adapter.down_proj_weight(2), copies.plain_adapter.down_proj_weight(2) / 2)
    assert len(calls) == len(modules)
    with transform_weights(copies.plain_adapter.decoder_linears(), halve):
        assert torch.equal(first, logits(copies.plain, IDS))
    copies.assert_untouched()


def test_transposed_conv1d_is_edited_in_out_in_order(copies: Copies) -> None:
    if copies.arch != "gpt2":
        pytest.skip("GPT-2's Conv1D stores [in, out]")
    module = copies.adapter.down_proj(2)
    assert is_offloaded(module)
    with edit_weight(module, (3, 5), value=7.0):
        assert read_tensor(module)[5, 3].item() == 7.0
        assert copies.adapter.weight(module)[3, 5].item() == 7.0
    copies.assert_untouched()


# ------------------------------------------------------------------------------------------------ every intervention


def _cases(adapter: ArchitectureAdapter) -> dict[str, Callable[[ArchitectureAdapter], AbstractContextManager[Any]]]:
    """One of each intervention, touching resident (layer 0) and offloaded layers (1, 2) alike."""
    n_heads = adapter.heads.n_heads
    return {
        "zero_weights": lambda a: zero_weights({m: (torch.tensor([0, 3, 5]), torch.tensor([1, 1, 7]))
                                                for m in (a.down_proj(2), a.attn_out(1), a.down_proj(0))}),
        "prune": lambda a: edit_down_proj_weights(a, [(0, 1, 2), (1, 3, 4), (2, 5, 6)], value=0.0),
        "scale": lambda a: edit_down_proj_weights(a, [(1, 3, 4), (2, 5, 6)], scale=100.0),
        "ablate_heads": lambda a: ablate_heads(a, {1: [0, 2], 2: [1]}),
        "heads_per_row": lambda a: scale_heads_per_row(a, 2, torch.rand(2, n_heads, generator=torch.Generator()
                                                                           .manual_seed(0))),
        "scale_neurons": lambda a: scale_neurons(a, {1: [3, 9], 2: [0]}, scale=4.0),
        "replace_ffn_output": lambda a: replace_activation(a, 2, 1, 3, torch.tensor(50.0)),
        "replace_neuron": lambda a: replace_activation(a, 1, 0, 7, 9.0, site="neurons"),
        "transform_inputs": lambda a: transform_inputs([a.down_proj(i) for i in range(a.n_layers)],
                                                       lambda x: x.round()),
        "quantize": lambda a: transform_weights(a.decoder_linears(), lambda o, w: w.copy_((o * 8).round() / 8)),
    }


CASES = ("zero_weights", "prune", "scale", "ablate_heads", "heads_per_row", "scale_neurons", "replace_ffn_output",
         "replace_neuron", "transform_inputs", "quantize")


@pytest.mark.parametrize("case", CASES)
def test_each_intervention_gives_the_plain_logits_and_restores(copies: Copies, case: str) -> None:
    build = _cases(copies.adapter)[case]
    with build(copies.adapter):
        offloaded = logits(copies.offloaded, IDS)
    with build(copies.plain_adapter):
        plain = logits(copies.plain, IDS)
    assert torch.equal(offloaded, plain)
    assert not torch.equal(offloaded, copies.clean)
    copies.assert_untouched()


def test_start_at_layer_on_an_offloaded_layer(copies: Copies) -> None:
    _, hidden = clean_hidden_states(copies.offloaded, IDS)
    with start_at_layer(copies.adapter, 2, hidden[2]), ablate_heads(copies.adapter, {2: [1]}):
        skipped = logits(copies.offloaded, IDS)
    with ablate_heads(copies.plain_adapter, {2: [1]}):
        full = logits(copies.plain, IDS)
    torch.testing.assert_close(skipped, full, rtol=0, atol=1e-6)
    copies.assert_untouched()


def test_random_nested_interventions_match_the_plain_model_and_restore(copies: Copies) -> None:
    """The hypothesis property of tests/test_interventions.py, on an offloaded model and its plain twin."""

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(specs=st.lists(interventions_for(copies.adapter, seq_len=SEQ_LEN), min_size=1, max_size=5),
           raise_at=st.one_of(st.none(), st.integers(0, 4)))
    def nested(specs: list[InterventionSpec], raise_at: int | None) -> None:
        with ExitStack() as plain_stack:
            for spec in specs:
                plain_stack.enter_context(spec.enter(copies.plain_adapter))
            expected = logits(copies.plain, IDS)
        try:
            with ExitStack() as stack:
                for depth, spec in enumerate(specs):
                    stack.enter_context(spec.enter(copies.adapter))
                    if raise_at == depth:
                        raise Boom
                assert torch.equal(logits(copies.offloaded, IDS), expected)
        except Boom:
            pass
        copies.assert_untouched()

    nested()


# ------------------------------------------------------------------------------------------------ super weights


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PreTrainedModel, PreTrainedModel]]:
    """A tiny Llama with a super weight planted at L1[5, 17], loaded plainly and with layer 1 on disk."""
    root = tmp_path_factory.mktemp("planted")
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    directory = save(model, root / "checkpoint")
    dmap = device_map(model, {1: "disk", 2: "disk"})
    offloaded = AutoModelForCausalLM.from_pretrained(directory, device_map=dmap,
                                                     offload_folder=str(root / "offload")).eval()
    yield model, offloaded


def held(model: PreTrainedModel) -> LoadedModel:
    """The one model handle around a test model (its hash is not what these tests are about)."""
    return LoadedModel.from_model(model, byte_tokenizer(), content_hash="test")


def test_a_super_weight_in_an_offloaded_layer_is_found_with_its_true_value(
        planted: tuple[PreTrainedModel, PreTrainedModel]) -> None:
    plain, offloaded = planted
    adapter = ArchitectureAdapter(offloaded)
    assert is_offloaded(adapter.down_proj(1))
    before = stored_values(offloaded)
    found = detect(held(offloaded), PLANT_PROMPT)
    reference = detect(held(plain), PLANT_PROMPT)
    assert found.coordinates == [(1, 5, 17)], f"expected L1[5, 17], found {found.labels()}"
    assert found.super_weights[0].weight == 8.0  # the true stored value, not a meta placeholder
    assert found.super_weights == reference.super_weights
    assert found.rounds[-1].spike_layers == ()  # zeroing it in the offloaded layer removed the spike
    after = stored_values(offloaded)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_super_weight_in_a_ram_offloaded_layer(tmp_path: Path) -> None:
    model = tiny_model("llama")
    plant_super_weight(model, layer=1, row=5, col=17)
    directory = save(model, tmp_path / "checkpoint")
    offloaded = ram_and_disk_offloaded(directory, tmp_path / "offload")
    found = detect(held(offloaded), PLANT_PROMPT)
    assert found.coordinates == [(1, 5, 17)] and found.super_weights[0].weight == 8.0


# ------------------------------------------------------------------------------------------------ devices


def test_resolve_device_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")


def test_resolve_device_checks_cuda_and_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="'cuda:0': .* sees no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="'mps': MPS is not available"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 \.\. cuda:1"):
        resolve_device("cuda:2")


def test_resolve_device_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for strategy in ("auto", "balanced", "sequential", "balanced_low_0"):
        assert resolve_device_map(strategy) == strategy
    good = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    assert resolve_device_map(good) == good
    path = tmp_path / "map.json"
    path.write_text(json.dumps(good))
    assert resolve_device_map(str(path)) == good and resolve_device_map(path) == good

    missing = tmp_path / "nope.json"
    with pytest.raises(DeviceError, match=f"device map file '{missing}' not found"):
        resolve_device_map(str(missing))
    path.write_text('{"model.layers.0": "cpu",')
    with pytest.raises(DeviceError, match=f"device map file '{path}': not valid JSON"):
        resolve_device_map(path)
    path.write_text('["cpu"]')
    with pytest.raises(DeviceError, match=f"'{path}': expected a JSON object .* got list"):
        resolve_device_map(path)
    path.write_text('{"model.layers.0": "gpu"}')
    with pytest.raises(DeviceError, match=f"'{path}': module 'model.layers.0': unknown device 'gpu'"):
        resolve_device_map(path)
    with pytest.raises(DeviceError, match="names no module"):
        resolve_device_map({})
    with pytest.raises(DeviceError, match="'model.norm': 'auto' is a whole device map"):
        resolve_device_map({"model.norm": "auto"})
    with pytest.raises(DeviceError, match="device must be a string or an int, got True"):
        resolve_device_map({"lm_head": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="module 'lm_head': device 'cuda:1': .* sees no CUDA device"):
        resolve_device_map({"lm_head": "cuda:1"})
    with pytest.raises(DeviceError, match="module 'lm_head': device 'cuda:0'"):
        resolve_device_map({"lm_head": 0})
