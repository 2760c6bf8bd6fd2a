"""The only module that registers forward hooks. Handles are always removed in ``finally``.

- :func:`hooks` installs forward pre-hooks (which may replace a module's inputs) and forward hooks (which may
  replace its output) for the duration of a ``with`` block.
- :func:`capture` records the input and/or output of named modules during a ``with`` block, detached.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn


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
