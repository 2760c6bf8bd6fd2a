"""Every intervention lmaudit makes, as a context manager that restores the model bit for bit on exit.

Weight edits save a clone of exactly the elements they change and copy it back in ``finally``; activation edits
are forward hooks (see :mod:`lmaudit.checks.core.hooks`) that disappear on exit. Nothing deep-copies the model. Read them as
what they do::

    with set_down_proj_weight(adapter, layer, row, col, value=0.0):   # a detected super weight, pruned
        ppl = perplexity(...)
    with ablate_heads(adapter, {layer: [head]}):
        acc = arithmetic_accuracy(...)

Sites for activations: the *neurons* of layer ℓ are the input of its down projection (``[.., intermediate]``);
the *FFN output* is the down projection's output (``[.., hidden]``), where the super activation appears.

Models that accelerate spreads over devices, CPU and disk (``device_map``, see :mod:`lmaudit.checks.core.devices`):

- A tensor an activation edit brings in (replacement values, scales, indices) is moved to the device of the
  activation it acts on, so layers may sit on different devices.
- A weight edit of an *offloaded* module (meta parameters; the values live in its ``AlignDevicesHook``'s
  ``weights_map`` and are materialized for each forward) never writes the stored data. For the block, the hook's
  ``weights_map`` is swapped for an overlay (:class:`_EditedWeights`) that hands accelerate the edited tensor
  under the edited name and the stored one under every other; on exit the hook gets its own map object back.

  Why not write the store and copy back, as for resident weights: for ``"disk"`` offload every read of the store
  is a fresh copy (of a memory map opened read-only, or of the very safetensors file the user loaded from), so a
  write to what was read is lost, and a write to the file itself would leave the user's checkpoint edited if the
  process died inside the block; for ``"cpu"`` offload a write would work, but one path for both is simpler to
  trust. Why not refuse: that would stop every super-weight and quantization check on exactly the models too
  large for memory, which is when offload is used. Why not append an accelerate hook that edits the weights
  after each load: appending and removing hooks re-runs accelerate's ``init_hook`` and ``detach_hook`` (which
  move parameters), whereas swapping one attribute of the existing hook touches nothing else, and a read of the
  weight inside the block (:func:`lmaudit.checks.core.devices.read_tensor`) sees the edit, as for resident ones.

  Costs: a point edit (:func:`edit_weight`) clones the stored weight on each forward of that module (no memory
  is held between forwards); :func:`transform_weights` runs ``write`` once on entry and holds the transformed
  weight in RAM for the block, as the resident path holds the saved original. Limits: only the module's own
  hook is edited, so a weight tied to another offloaded module changes only where it was edited; a meta weight
  that no hook of its own module holds is refused (:class:`~lmaudit.checks.core.devices.OffloadError`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import nn

from lmaudit.checks.core.adapter import ArchitectureAdapter, out_in
from lmaudit.checks.core.devices import offload_hook, read_tensor
from lmaudit.checks.core.errors import LmAuditError
from lmaudit.checks.core.hooks import first_tensor, hooks

HeadSpec = Mapping[int, Iterable[int]]  # layer -> heads
NeuronSpec = Mapping[int, Iterable[int]]  # layer -> neuron indices (input channels of down_proj)


class InterventionError(LmAuditError, ValueError):
    """An intervention asked for something impossible (both or neither of value/scale, a bad site or shape)."""


class _EditedWeights(Mapping[str, torch.Tensor]):
    """An offloaded module's weights map with tensor ``name`` edited: what its accelerate hook reads while an
    edit is in force. Either ``value`` (a tensor computed once) or ``edit`` (applied in place to a fresh clone of
    the stored tensor on every read) gives the edited tensor; every other name reads through to ``base``."""

    def __init__(self, base: Mapping[str, torch.Tensor], name: str, *, value: torch.Tensor | None = None,
                 edit: Callable[[torch.Tensor], None] | None = None) -> None:
        self.base, self.name, self.value, self.edit = base, name, value, edit

    def __getitem__(self, key: str) -> torch.Tensor:
        if key != self.name:
            return self.base[key]
        if self.value is not None:
            return self.value
        tensor = self.base[key].detach().clone()  # never the stored tensor: cpu offload keeps it in RAM
        with torch.no_grad():
            self.edit(tensor)  # type: ignore[misc]
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


@contextmanager
def _overlaid(hook: Any, overlay: _EditedWeights) -> Iterator[None]:
    """Give ``hook`` the ``overlay`` as its weights map for the block; take it out again on exit, also when
    edits on the same module exit out of order (the overlay is then unlinked from the chain above it)."""
    hook.weights_map = overlay
    try:
        yield
    finally:
        if hook.weights_map is overlay:
            hook.weights_map = overlay.base
        else:
            above = hook.weights_map
            while isinstance(above, _EditedWeights) and above.base is not overlay:
                above = above.base
            if isinstance(above, _EditedWeights):
                above.base = overlay.base


def _on(tensor: torch.Tensor, value: float | torch.Tensor) -> float | torch.Tensor:
    """``value`` on ``tensor``'s device and dtype when it is a tensor (a float needs no moving)."""
    return value.to(tensor.device, tensor.dtype) if isinstance(value, torch.Tensor) else value


@contextmanager
def edit_weight(
    module: nn.Module, index: Any, *, value: float | torch.Tensor | None = None,
    scale: float | None = None,
) -> Iterator[torch.Tensor]:
    """Set ``W[index] = value`` or ``W[index] *= scale`` on the ``[out, in]`` view of ``module``'s weight.

    Yields the original values; restores them bit for bit on exit. A resident weight is written in place and its
    original elements copied back in ``finally``; an offloaded one is edited where accelerate materializes it
    (see the module docstring), so its stored data is never written.
    """
    if (value is None) == (scale is None):
        raise InterventionError("edit_weight: give exactly one of value= or scale=")
    hook = offload_hook(module)
    if hook is not None:
        original = out_in(module, hook.weights_map["weight"])[index].detach().clone()
        new = original * scale if scale is not None else value

        def edit(stored: torch.Tensor) -> None:
            out_in(module, stored)[index] = _on(stored, new)

        with _overlaid(hook, _EditedWeights(hook.weights_map, "weight", edit=edit)):
            yield original
        return
    weight = out_in(module, read_tensor(module))
    original = weight[index].detach().clone()
    try:
        with torch.no_grad():
            weight[index] = _on(weight, value) if value is not None else original * scale
        yield original
    finally:
        with torch.no_grad():
            weight[index] = original


@contextmanager
def zero_weights(indices: Mapping[nn.Module, tuple[Any, Any]]) -> Iterator[None]:
    """Set the given ``(rows, cols)`` of each module's ``[out, in]`` weight to 0 (a stack of :func:`edit_weight`;
    ``rows`` and ``cols`` index together, as ``W[rows, cols]``)."""
    with ExitStack() as stack:
        for module, (rows, cols) in indices.items():
            stack.enter_context(edit_weight(module, (rows, cols), value=0.0))
        yield


@contextmanager
def set_down_proj_weight(
    adapter: ArchitectureAdapter, layer: int, row: int, col: int, *, value: float | None = None,
    scale: float | None = None,
) -> Iterator[float]:
    """``W_down[layer][row, col] = value`` (or ``*= scale``); yields the original value."""
    with edit_weight(adapter.down_proj(layer), (row, col), value=value, scale=scale) as original:
        yield float(original)


@contextmanager
def edit_down_proj_weights(
    adapter: ArchitectureAdapter, coordinates: Iterable[tuple[int, int, int]], *, value: float | None = None,
    scale: float | None = None,
) -> Iterator[None]:
    """Apply :func:`set_down_proj_weight` to every ``(layer, row, col)`` (e.g. prune all super weights)."""
    with ExitStack() as stack:
        for layer, row, col in coordinates:
            stack.enter_context(set_down_proj_weight(adapter, layer, row, col, value=value, scale=scale))
        yield


@contextmanager
def ablate_heads(adapter: ArchitectureAdapter, heads: HeadSpec, *, scale: float = 0.0) -> Iterator[None]:
    """Multiply each chosen head's contribution by ``scale`` (0 = ablate).

    Head ``h`` of layer ℓ contributes ``W_O[:, h·d:(h+1)·d] · z_h`` to the attention output, where ``z_h`` is its
    slice of the output projection's input; the pre-hook scales that slice, so ``W_O`` and its bias are untouched.
    """
    pre = []
    for layer, layer_heads in heads.items():
        columns = [adapter.heads.columns(h) for h in layer_heads]

        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               columns: list[slice] = columns) -> Any:
            x = args[0].clone()
            for cols in columns:
                x[..., cols] *= scale
            return (x, *args[1:]), kwargs

        pre.append((adapter.attn_out(layer), fn))
    with hooks(pre=pre):
        yield


@contextmanager
def scale_heads_per_row(adapter: ArchitectureAdapter, layer: int, scales: torch.Tensor) -> Iterator[None]:
    """Batched head ablation: batch row ``b`` multiplies head ``h`` of ``layer`` by ``scales[b, h]``.

    ``scales``: ``(batch, n_heads)``. One forward pass then evaluates a different ablation per row.
    """
    n_heads, head_dim = adapter.heads.n_heads, adapter.heads.head_dim
    if scales.ndim != 2 or scales.shape[1] != n_heads:
        raise InterventionError(f"scale_heads_per_row: scales must be (batch, {n_heads}), got {tuple(scales.shape)}")

    def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]  # (batch, seq, n_heads*head_dim)
        b, t, _ = x.shape
        factors = scales.to(x.device, x.dtype).view(b, 1, n_heads, 1)
        x = (x.view(b, t, n_heads, head_dim) * factors).view(b, t, n_heads * head_dim)
        return (x, *args[1:]), kwargs

    with hooks(pre=[(adapter.attn_out(layer), fn)]):
        yield


@contextmanager
def scale_neurons(adapter: ArchitectureAdapter, neurons: NeuronSpec, *, scale: float = 0.0) -> Iterator[None]:
    """Multiply FFN neuron activations ``m_k`` (the down projection's input channels) by ``scale``."""
    pre = []
    for layer, indices in neurons.items():
        index = torch.as_tensor(sorted(set(indices)), dtype=torch.long)

        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               index: torch.Tensor = index) -> Any:
            x = args[0].clone()
            x[..., index.to(x.device)] *= scale
            return (x, *args[1:]), kwargs

        pre.append((adapter.down_proj(layer), fn))
    with hooks(pre=pre):
        yield


def zero_neurons(adapter: ArchitectureAdapter, neurons: NeuronSpec) -> Any:
    """:func:`scale_neurons` with ``scale=0``."""
    return scale_neurons(adapter, neurons, scale=0.0)


ActivationSite = Literal["ffn_output", "neurons"]


@contextmanager
def replace_activation(
    adapter: ArchitectureAdapter, layer: int, token: int, channel: int, value: float | torch.Tensor,
    *, site: ActivationSite = "ffn_output",
) -> Iterator[None]:
    """Set the activation at ``(layer, token, channel)`` to ``value`` in every batch row.

    ``site="ffn_output"``: the down projection's output ``y[:, token, channel]`` (the super activation's place);
    ``site="neurons"``: its input ``x[:, token, channel]``.
    """
    module = adapter.down_proj(layer)

    def set_value(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, token, channel] = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        return x

    if site == "ffn_output":
        def fwd(m: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return set_value(output)

        with hooks(forward=[(module, fwd)]):
            yield
    elif site == "neurons":
        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return (set_value(args[0]), *args[1:]), kwargs

        with hooks(pre=[(module, pre)]):
            yield
    else:
        raise InterventionError(f"replace_activation: unknown site {site!r}: use 'ffn_output' or 'neurons'")


@contextmanager
def transform_weights(
    modules: Mapping[str, nn.Module] | Sequence[nn.Module],
    write: Callable[[torch.Tensor, torch.Tensor], object],
) -> Iterator[None]:
    """Inside the block each module's ``[out, in]`` weight holds ``write(original, weight)``'s result (e.g.
    fake quantization); the originals are copied back bit for bit on exit.

    For each module the original is saved first, then ``write(original, weight)`` writes the new values into the
    module's own weight tensor, reading only ``original``. So no weight-sized temporary exists beyond the saved
    copy: a fresh result tensor per Linear page-faults new memory and, freed between the persistent saved
    copies, leaves heap holes (measured on smollm2-135m-instruct: +160 MB resident, +0.3x of the model in peak
    memory). ``write`` runs once on entry, not on every forward pass. Memory: one copy of the chosen weights.

    An offloaded module gets the same call with a RAM copy of its stored weight as ``weight``; that copy is what
    its accelerate hook materializes inside the block (see the module docstring), and the store is never
    written. Memory there: the transformed copy, held for the block instead of the saved original.
    """
    items = list(modules.values()) if isinstance(modules, Mapping) else list(modules)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with ExitStack() as overlays:
        try:
            with torch.no_grad():
                for module in items:
                    hook = offload_hook(module)
                    if hook is not None:
                        original = hook.weights_map["weight"].detach().clone()
                        result = original.clone()
                        write(out_in(module, original), out_in(module, result))
                        del original
                        overlays.enter_context(_overlaid(hook, _EditedWeights(hook.weights_map, "weight",
                                                                              value=result)))
                        continue
                    weight = out_in(module, read_tensor(module))
                    original = weight.detach().clone()
                    saved.append((weight, original))
                    write(original, weight.detach())
            yield
        finally:
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)


@contextmanager
def transform_inputs(
    modules: Mapping[str, nn.Module] | Sequence[nn.Module],
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Feed each module ``transform(x)`` instead of its input ``x`` (e.g. simulated activation quantization); the
    result is moved to ``x``'s device, should ``transform`` compute elsewhere."""
    items = list(modules.values()) if isinstance(modules, Mapping) else list(modules)

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        return (transform(x).to(x.device), *args[1:]), kwargs

    with hooks(pre=[(module, pre) for module in items]):
        yield


@contextmanager
def prune_and_restore(adapter: ArchitectureAdapter, coordinates: Sequence[tuple[int, int, int]]) -> Iterator[None]:
    """Prune every super weight and put its row's super activation back where it sits in each sequence (Yu et
    al. 2024, Table 1 "Prune SW, +SA").

    For each pruned ``W_down[row, col]`` of a layer, the down projection's output row ``y[..., row]`` is
    recomputed with the weights present (``y + Σ_col x[..., col]·w``), the position of its largest magnitude in
    each sequence is found, and only that position gets the clean value back: the rule of the paper's code
    (``removeSW_restoreSA``), so the super activation is restored where it was measured, in every sequence.
    """
    rows: dict[int, dict[int, list[tuple[int, float]]]] = {}  # layer -> row -> [(col, original weight)]
    for layer, row, col in coordinates:
        weight = float(adapter.down_proj_weight(layer)[row, col].detach())
        rows.setdefault(layer, {}).setdefault(row, []).append((col, weight))

    def restore(groups: dict[int, list[tuple[int, float]]]) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
            x, y = args[0], first_tensor(output).clone()  # x (b, t, intermediate), y (b, t, hidden)
            for row, weights in groups.items():
                cols = torch.tensor([c for c, _ in weights], device=x.device)
                w = torch.tensor([v for _, v in weights], dtype=x.dtype, device=x.device)
                clean = y[..., row] + (x[..., cols] * w).sum(-1)  # (b, t): the output with the weights present
                peak = clean.abs().argmax(dim=-1, keepdim=True)  # (b, 1): where the super activation sits
                y[..., row].scatter_(-1, peak, clean.gather(-1, peak))
            return y

        return fn

    with edit_down_proj_weights(adapter, coordinates, value=0.0), hooks(forward=[(adapter.down_proj(layer), restore(groups))
                                                     for layer, groups in rows.items()]):
        yield
