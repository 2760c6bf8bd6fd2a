"""The only module that registers forward hooks. Handles are always removed in ``finally``.

- :func:`hooks` installs forward pre-hooks (which may replace a module's inputs) and forward hooks (which may
  replace its output) for the duration of a ``with`` block.
- :func:`capture` records the input and/or output of named modules during a ``with`` block, detached.
- :func:`nonfinite_guard` raises :class:`~lmaudit.checks.core.errors.NonFiniteOutputError` at the first module
  output (embedding, each decoder layer, final norm, unembedding) that holds a NaN or an inf, naming it;
  :func:`locate_nonfinite` re-runs a forward pass under the guard to find where non-finite logits came from.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from lmaudit.checks.core.errors import NonFiniteOutputError
from lmaudit.checks.core.finite import all_finite, describe_nonfinite, nonfinite_parameters

if TYPE_CHECKING:
    from lmaudit.checks.core.adapter import ArchitectureAdapter


class PreHook(Protocol):
    """``fn(module, args, kwargs) -> (args, kwargs) | None``: return new inputs to replace them."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


class ForwardHook(Protocol):
    """``fn(module, args, output) -> output | None``: return a new output to replace it."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any: ...


@contextmanager
def hooks(
    *,
    pre: Iterable[tuple[nn.Module, PreHook]] = (),
    forward: Iterable[tuple[nn.Module, ForwardHook]] = (),
) -> Iterator[None]:
    """Install the given hooks inside the block; remove every handle on exit, also when the body raises."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in forward:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple starting with one."""
    return value if isinstance(value, torch.Tensor) else value[0]


@dataclass
class Captured:
    """Inputs and outputs recorded by :func:`capture`, keyed by module name; lists hold one entry per call."""

    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def input(self, name: str) -> torch.Tensor:
        """The last recorded input of ``name``."""
        return self.inputs[name][-1]

    def output(self, name: str) -> torch.Tensor:
        return self.outputs[name][-1]


@contextmanager
def capture(
    modules: Mapping[str, nn.Module], *, what: Literal["input", "output", "both"] = "both"
) -> Iterator[Captured]:
    """Record (detached) the first positional input and/or the output tensor of each named module."""
    captured = Captured()

    def pre_hook(name: str) -> PreHook:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensor = args[0] if args else next(iter(kwargs.values()))
            captured.inputs.setdefault(name, []).append(first_tensor(tensor).detach())

        return fn

    def out_hook(name: str) -> ForwardHook:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.outputs.setdefault(name, []).append(first_tensor(output).detach())

        return fn

    pre = [(m, pre_hook(n)) for n, m in modules.items()] if what in ("input", "both") else []
    fwd = [(m, out_hook(n)) for n, m in modules.items()] if what in ("output", "both") else []
    with hooks(pre=pre, forward=fwd):
        yield captured


# ------------------------------------------------------------------------------------------- non-finite guard

_GUARDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models inside a nonfinite_guard block


def _guarded_modules(adapter: ArchitectureAdapter) -> list[tuple[str, str, nn.Module]]:
    """``(label, named_modules name, module)`` in forward order: embedding, layers, final norm, unembedding."""
    layers = [(f"layer {i}", f"{adapter.layers_path}.{i}", layer) for i, layer in enumerate(adapter.layer_list)]
    return [
        ("embedding", adapter.module_name(adapter.embedding), adapter.embedding),
        *layers,
        ("final norm", adapter.final_norm_path, adapter.final_norm),
        ("unembedding", adapter.module_name(adapter.unembedding), adapter.unembedding),
    ]


def _raise_if_nonfinite(label: str, name: str, watched: nn.Module) -> ForwardHook:
    def check(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if module is not watched:  # a deepcopy of the guarded model (a fine-tune's base) carries the hook along
            return
        tensor = first_tensor(output).detach()
        if all_finite(tensor):
            return
        bad = nonfinite_parameters(module, name)
        cause = (f"its weights hold non-finite values: {', '.join(bad[:3])}" if bad
                 else "its weights are finite, so its computation overflowed or an edit in effect produced it")
        raise NonFiniteOutputError(
            f"{label} ({name}) output holds {describe_nonfinite(tensor)}; {cause}. "
            "Check the weights and any intervention in effect, or load in float32."
        )

    return check


@contextmanager
def nonfinite_guard(adapter: ArchitectureAdapter) -> Iterator[None]:
    """Inside the block, every forward pass checks the output of the embedding, of each decoder layer, of the
    final norm and of the unembedding, in that order, and raises
    :class:`~lmaudit.checks.core.errors.NonFiniteOutputError` at the first one that holds a NaN or an inf:

        layer 1 (model.layers.1) output holds 12 NaN / 0 inf of 224 values; its weights hold non-finite values:
        model.layers.1.mlp.down_proj.weight (1 NaN / 0 inf). Check the weights and any intervention in effect, ...

    Each output costs one float32 sum (:func:`~lmaudit.checks.core.finite.all_finite`). Nested guards on the same
    model are one guard. A hook that an intervention registers on a checked module *after* the guard runs after
    the check, so what it writes is caught at the next checked output.
    """
    model = adapter.model
    if model in _GUARDED:
        yield
        return
    checks = [(module, _raise_if_nonfinite(label, name, module)) for label, name, module in _guarded_modules(adapter)]
    _GUARDED.add(model)
    try:
        with hooks(forward=checks):
            yield
    finally:
        _GUARDED.discard(model)


def locate_nonfinite(adapter: ArchitectureAdapter, run: Callable[[], object]) -> str | None:
    """Run ``run()`` (a forward pass that produced non-finite logits) under :func:`nonfinite_guard`: the guard's
    message naming the first non-finite module output, or ``None`` when every checked output was finite."""
    try:
        with nonfinite_guard(adapter):
            run()
    except NonFiniteOutputError as exc:
        return str(exc)
    return None
