"""The one module that knows where each architecture keeps its modules.

Checks never write ``model.model.layers[i].mlp.down_proj``: they ask the adapter. The adapter finds, by probing
a short list of known attribute paths (no model-id strings), for every decoder layer:

- the MLP down projection (input = the FFN neuron activations; :meth:`ArchitectureAdapter.weight` presents its
  weight as ``[hidden, intermediate]``, i.e. ``[out, in]``, also for GPT-2's transposed ``Conv1D``),
- the up and gate projections, or the fused ``gate_up_proj`` (Phi-3),
- the attention output projection and the head layout (heads, kv heads, head_dim): head ``h`` owns input
  columns ``h·head_dim … (h+1)·head_dim − 1`` of the output projection,
- the layer's norms,

and, for the whole model, the embedding, the final norm and the unembedding (tied or not), with the final-logit
soft-capping of Gemma 2/3 applied by :meth:`ArchitectureAdapter.logits`.

Supported: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), OLMo, OLMo2, Phi-3, GPT-2, GPT-NeoX, and
any other model whose modules sit at one of the probed paths. Anything else raises
:class:`~lmaudit.checks.core.errors.UnsupportedArchitectureError` naming every path that was looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from lmaudit.checks.core.devices import execution_device, mapped_device, read_tensor, stored_where
from lmaudit.checks.core.errors import UnsupportedArchitectureError

# Probed attribute paths, most common first. ``{i}`` in reports stands for the layer index.
LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers")
FINAL_NORMS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm")
ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.dense", "self_attn.dense", "self_attn.out_proj")
DOWN_PROJ = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2")
UP_PROJ = ("mlp.up_proj", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc1")
GATE_PROJ = ("mlp.gate_proj",)
GATE_UP_PROJ = ("mlp.gate_up_proj",)
# A norm applied to the MLP's output before the residual add (Gemma 2/3, OLMo 2 "sandwich" norms):
# h_{l+1} = r + norm(y_l), so what the layer writes into the residual stream is norm(y), not y.
POST_FFN_NORM = ("post_feedforward_layernorm",)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(root: nn.Module, paths: tuple[str, ...]) -> tuple[str, Any] | tuple[None, None]:
    for path in paths:
        found = _get(root, path)
        if found is not None:
            return path, found
    return None, None


def is_transposed(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as ``[in, out]``; ``nn.Linear`` as ``[out, in]``."""
    return type(module).__name__ == "Conv1D"


def out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight``, stored the way ``module`` stores its weight, as an ``[out, in]`` view."""
    return weight.t() if is_transposed(module) else weight


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight parameter as an ``[out, in]`` *view* (writes through to the parameter).

    For a module that accelerate has offloaded this is a *meta* view (shape and dtype, no values): read values
    with :meth:`ArchitectureAdapter.weight`, edit them with :mod:`lmaudit.checks.core.interventions`.
    """
    return out_in(module, module.weight)


@dataclass(frozen=True)
class LayerModules:
    """One decoder layer's modules. ``gate_proj``/``up_proj`` are ``None`` when fused into ``gate_up_proj``."""

    index: int
    layer: nn.Module
    attn_out: nn.Module
    down_proj: nn.Module
    up_proj: nn.Module | None
    gate_proj: nn.Module | None
    gate_up_proj: nn.Module | None
    norms: dict[str, nn.Module]
    post_ffn_norm: nn.Module | None = None  # norm(y) is added to the residual instead of y (sandwich norms)


@dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def columns(self, head: int) -> slice:
        """Input columns of the attention output projection that carry head ``head``."""
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} out of range: the model has {self.n_heads} heads per layer")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)


def _config_int(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    if default is None:
        raise UnsupportedArchitectureError(f"config has none of {names}")
    return default


class ArchitectureAdapter:
    """Where the modules of one loaded causal LM are, and its shape numbers (from its config)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        if self.config is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__} has no .config: not a transformers model")
        self.text_config = (self.config.get_text_config() if hasattr(self.config, "get_text_config")
                            else self.config)
        self.layers_path, layers = _first(model, LAYER_LISTS)
        if layers is None or not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: no decoder layer list found. Looked for: {', '.join(LAYER_LISTS)}"
            )
        self.layer_list: nn.ModuleList = layers
        self.layers = tuple(self._layer_modules(i, layer) for i, layer in enumerate(layers))
        self.final_norm_path, self.final_norm = _first(model, FINAL_NORMS)
        if self.final_norm is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}: no final norm found. Looked for: {', '.join(FINAL_NORMS)}"
            )
        self.unembedding = model.get_output_embeddings()
        self.embedding = model.get_input_embeddings()
        if self.unembedding is None or self.embedding is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__}: no input or output embedding")
        cfg = self.text_config
        hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
        n_heads = _config_int(cfg, "num_attention_heads", "n_head")
        self.heads = HeadLayout(
            n_heads=n_heads,
            n_kv_heads=_config_int(cfg, "num_key_value_heads", default=n_heads),
            head_dim=_config_int(cfg, "head_dim", default=hidden // n_heads),
        )
        self.hidden_size = hidden
        self.intermediate_size = weight_out_in(self.layers[0].down_proj).shape[1]
        self.final_logit_softcapping: float | None = getattr(cfg, "final_logit_softcapping", None)

    def _layer_modules(self, index: int, layer: nn.Module) -> LayerModules:
        found: dict[str, Any] = {}
        for role, paths in (("attn_out", ATTN_OUT), ("down_proj", DOWN_PROJ), ("up_proj", UP_PROJ),
                            ("gate_proj", GATE_PROJ), ("gate_up_proj", GATE_UP_PROJ)):
            found[role] = _first(layer, paths)[1]
        missing = [role for role in ("attn_out", "down_proj") if found[role] is None]
        if found["up_proj"] is None and found["gate_up_proj"] is None:
            missing.append("up_proj")
        if missing:
            looked = {"attn_out": ATTN_OUT, "down_proj": DOWN_PROJ, "up_proj": UP_PROJ + GATE_UP_PROJ}
            detail = "; ".join(f"{role}: {', '.join(looked[role])}" for role in missing)
            raise UnsupportedArchitectureError(
                f"{type(self.model).__name__} layer {index} ({type(layer).__name__}): missing {', '.join(missing)}. "
                f"Looked for {detail}"
            )
        norms = {name: module for name, module in layer.named_modules()
                 if name and "norm" in type(module).__name__.lower()}
        post_ffn_norm = _first(layer, POST_FFN_NORM)[1]
        return LayerModules(index=index, layer=layer, norms=norms, post_ffn_norm=post_ffn_norm, **found)

    # ------------------------------------------------------------------ shape numbers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def parameter_count(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def tied_embeddings(self) -> bool:
        """One tensor for the embedding and the unembedding (offloaded meta tensors all have data_ptr 0, so
        those count as tied only when they are the same parameter)."""
        emb, unemb = self.embedding.weight, self.unembedding.weight
        if emb is unemb:
            return True
        return not (emb.is_meta or unemb.is_meta) and unemb.data_ptr() == emb.data_ptr()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where input ids go: the embedding's execution device (accelerate's, when it dispatched the model and
        perhaps offloaded the embedding to meta), else the device of the first parameter."""
        device = execution_device(self.embedding)
        return device if device is not None else next(self.model.parameters()).device

    # ------------------------------------------------------------------ module access

    def layer(self, index: int) -> LayerModules:
        if not 0 <= index < self.n_layers:
            raise IndexError(f"layer {index} out of range: the model has {self.n_layers} layers")
        return self.layers[index]

    def down_proj(self, layer: int) -> nn.Module:
        return self.layer(layer).down_proj

    def attn_out(self, layer: int) -> nn.Module:
        return self.layer(layer).attn_out

    @property
    def sandwich_norms(self) -> bool:
        """True when the MLP output passes through a norm before the residual add (Gemma 2/3, OLMo 2)."""
        return self.layers[0].post_ffn_norm is not None

    def ffn_write_module(self, layer: int) -> nn.Module:
        """The module whose output layer ``layer`` adds to the residual stream from its MLP branch: the post-FFN
        norm when the architecture has one, else the down projection."""
        found = self.layer(layer)
        return found.post_ffn_norm if found.post_ffn_norm is not None else found.down_proj

    def ffn_write(self, layer: int, y: torch.Tensor) -> torch.Tensor:
        """What layer ``layer`` adds to the residual stream for down-projection output ``y``: ``norm(y)`` with
        sandwich norms, else ``y`` itself."""
        norm = self.layer(layer).post_ffn_norm
        return norm(y) if norm is not None else y

    @staticmethod
    def weight(module: nn.Module) -> torch.Tensor:
        """``[out, in]`` view of a projection's weight values (``down_proj``: ``[hidden, intermediate]``).

        Also for a module that accelerate offloaded (meta parameters): the values come from its hook's weights
        map, with any intervention in force (:func:`lmaudit.checks.core.devices.read_tensor`). Only a resident
        weight writes through; edit weights with :mod:`lmaudit.checks.core.interventions`.
        """
        return out_in(module, read_tensor(module))

    def down_proj_weight(self, layer: int) -> torch.Tensor:
        """``W_down`` of ``layer`` as ``[hidden, intermediate]``: column ``k`` is neuron ``k``'s output vector
        (read as :meth:`weight` reads, so offloaded layers give their real values)."""
        return self.weight(self.down_proj(layer))

    def decoder_linears(self) -> dict[str, nn.Module]:
        """Every Linear/Conv1D inside the decoder layers, by its ``named_modules()`` name."""
        prefix = self.layers_path
        return {f"{prefix}.{name}": module for name, module in self.layer_list.named_modules()
                if isinstance(module, nn.Linear) or is_transposed(module)}

    def module_name(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise KeyError(f"{type(module).__name__} is not a submodule of the model")

    # ------------------------------------------------------------------ logits from the residual stream

    def logits(self, residual: torch.Tensor) -> torch.Tensor:
        """``logits = cap(unembed(final_norm(residual)))`` — the model's own head applied to any residual.

        ``cap(z) = c·tanh(z/c)`` when the config sets ``final_logit_softcapping = c`` (Gemma 2/3), else ``z``.
        """
        logits = self.unembedding(self.final_norm(residual))
        if self.final_logit_softcapping:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ report

    def module_paths(self) -> dict[str, str]:
        """Where each role was found, with the layer index written as ``{i}``."""
        first = self.layers[0]
        base = f"{self.layers_path}.{{i}}"

        def rel(module: nn.Module | None) -> str:
            if module is None:
                return "-"
            for name, candidate in first.layer.named_modules():
                if candidate is module:
                    return f"{base}.{name} ({type(module).__name__})"
            return type(module).__name__

        paths = {
            "layers": f"{self.layers_path} ({type(first.layer).__name__} x {self.n_layers})",
            "attn_out": rel(first.attn_out),
            "down_proj": rel(first.down_proj),
            "up_proj": rel(first.up_proj),
            "gate_proj": rel(first.gate_proj),
            "gate_up_proj": rel(first.gate_up_proj),
            "norms": ", ".join(f"{base}.{name}" for name in first.norms) or "-",
            "post_ffn_norm": rel(first.post_ffn_norm),
            "final_norm": f"{self.final_norm_path} ({type(self.final_norm).__name__})",
            "unembedding": f"{self.module_name(self.unembedding)} "
                           f"({'tied to the embedding' if self.tied_embeddings else 'untied'})",
        }
        return paths

    def summary(self) -> dict[str, Any]:
        return {
            "model_type": getattr(self.config, "model_type", type(self.model).__name__),
            "n_layers": self.n_layers,
            "n_heads": self.heads.n_heads,
            "n_kv_heads": self.heads.n_kv_heads,
            "head_dim": self.heads.head_dim,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "parameters": self.parameter_count,
            "dtype": str(self.dtype).removeprefix("torch."),
            "tied_embeddings": self.tied_embeddings,
            "modules": self.module_paths(),
        }


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of ``model`` (built once per model object and kept on it)."""
    cached = getattr(model, "_lmaudit_adapter", None)
    if cached is None or cached.model is not model:
        cached = ArchitectureAdapter(model)
        object.__setattr__(model, "_lmaudit_adapter", cached)
    return cached


def placement(model: nn.Module) -> dict[str, str]:
    """``{decoder layer name: where it lives}``: ``"cpu"``, ``"disk"``, ``"cuda:0"``, ``"mps"``, ...

    From the model's ``hf_device_map`` when accelerate dispatched it (what was asked, as accelerate records it),
    else from the parameters (an offloaded module counts as ``"cpu"`` when its values sit in RAM, ``"disk"``
    when they are read from a file). A layer whose parts live apart reads e.g. ``"cpu, disk"``.
    """
    adapter = adapter_for(model)
    device_map = getattr(model, "hf_device_map", None)
    out = {}
    for found in adapter.layers:
        name = f"{adapter.layers_path}.{found.index}"
        mapped = mapped_device(device_map, name) if device_map else None
        out[name] = mapped if mapped is not None else stored_where(found.layer)
    return out
