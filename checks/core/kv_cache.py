"""Key/value caches across transformers versions: read one from a model output, build one, pass one in.

Shared by the checks that run a token prefix once and reuse its keys/values (the head sweep, the CNA accuracy
evaluator, the prefix-cached bias scores). transformers ≥ 5.x returns the cache as ``output.cache`` and takes it
as ``cache=``; earlier versions use ``past_key_values`` for both.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values, each (batch, kv_heads, t, d)


def output_cache(output: Any) -> Any:
    """The cache object of a model output (``.cache``, else ``.past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def layer_keys_values(output: Any) -> KeysValues:
    """Per-layer keys/values held by a model output's cache."""
    return [(layer.keys, layer.values) for layer in output_cache(output).layers]


def cache_argument(model: Any) -> str:
    """The forward argument that takes a cache: ``cache`` (new transformers) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_from(model: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding ``kv`` (it copies each tensor once, so views such as ``expand`` are fine)."""
    return DynamicCache(ddp_cache_data=list(kv), config=model.config)
