"""Where a model runs and where its weights live: device strings, device maps, and accelerate's offload.

- :func:`resolve_device` and :func:`resolve_device_map` turn what a user typed into a device or a ``device_map``
  and fail with :class:`DeviceError` before any model loads (a CUDA string on a machine without CUDA, a device map
  file that is missing or not JSON). CUDA, MPS and CPU go through the same code; only the string differs.
- :func:`placement` says where every decoder layer lives (``{"model.layers.3": "cuda:0", ...}``).
- :func:`offload_hook`, :func:`read_tensor` and :func:`execution_device` see through accelerate's big-model
  dispatch (``from_pretrained(..., device_map=..., offload_folder=...)`` or ``accelerate.dispatch_model``).

Offload in one paragraph: a module that accelerate offloads keeps *meta* parameters (a shape and a dtype, no
data). Its ``_hf_hook`` (an ``AlignDevicesHook`` with ``offload=True``) holds a ``weights_map`` from the module's
tensor names (``"weight"``, ``"bias"``) to the real values: tensors in RAM for ``"cpu"`` offload, the checkpoint's
own safetensors file or memory-mapped ``.dat`` files for ``"disk"`` offload. Before each forward the hook reads the
map, puts the values on the module's execution device, and after the forward sets them back to meta. So the values
of an offloaded weight are ``hook.weights_map[name]``, never ``module.weight``. This module only reads that state;
edits of offloaded weights live in :mod:`lmaudit.checks.core.interventions` with the other edits.

accelerate is recognised by duck typing (a hook with ``offload``/``weights_map``/``execution_device``), so lmaudit
needs no import of it to audit an ordinary model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmaudit.checks.core.errors import LmAuditError

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's own device maps
OFFLOAD_TARGETS = ("cpu", "disk")  # device-map values that accelerate may offload instead of placing
DeviceMap = dict[str, str | int]


class DeviceError(LmAuditError, ValueError):
    """A device or device map that this machine cannot honour; the message names the device or the file."""


class OffloadError(LmAuditError):
    """An offloaded weight that lmaudit cannot reach; the message names the module."""


# ------------------------------------------------------------------------------------------------ devices


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``, checked against
    this machine: a device that torch cannot see is a :class:`DeviceError` naming it."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    _check_available(device, spec)
    return device


def _check_available(device: torch.device, spec: object) -> None:
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: torch {torch.__version__} sees no CUDA device on this machine "
                              "(use cpu or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {spec!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 .. cuda:{count - 1}")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {spec!r}: MPS is not available on this machine (use cpu or auto)")
        return
    raise DeviceError(f"device {spec!r}: lmaudit runs on cpu, cuda or mps, not {device.type}")


def resolve_device_map(spec: str | os.PathLike[str] | Mapping[str, str | int]) -> str | DeviceMap:
    """A ``device_map`` for ``from_pretrained``, validated before any model loads.

    ``spec``: one of accelerate's strategies (:data:`DEVICE_MAP_STRATEGIES`, returned as is), a mapping from
    module name to device, or the path of a JSON file holding such a mapping. Each device is ``"cpu"``,
    ``"disk"``, a device string :func:`resolve_device` accepts, or an int (accelerate's "accelerator N", i.e.
    ``cuda:N``); accelerators must exist on this machine. A missing file, malformed JSON, a non-object, an
    empty map or a bad device is a :class:`DeviceError` naming the file (or ``device_map``) and the key.
    """
    if isinstance(spec, str) and spec in DEVICE_MAP_STRATEGIES:
        return spec
    if isinstance(spec, Mapping):
        return _validated_map(spec, "device_map")
    if not isinstance(spec, str | os.PathLike):
        raise DeviceError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON file or a "
                          f"mapping, got {type(spec).__name__}")
    path = Path(spec)
    if not path.is_file():
        raise DeviceError(f"device map file {str(path)!r} not found (a device map is one of "
                          f"{', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON file of module name -> device)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeviceError(f"device map file {str(path)!r}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DeviceError(f"device map file {str(path)!r}: expected a JSON object of module name -> device, "
                          f"got {type(raw).__name__}")
    return _validated_map(raw, f"device map file {str(path)!r}")


def _validated_map(raw: Mapping[Any, Any], where: str) -> DeviceMap:
    if not raw:
        raise DeviceError(f"{where}: names no module")
    out: DeviceMap = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise DeviceError(f"{where}: module names must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise DeviceError(f"{where}: module {key!r}: device must be a string or an int, got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise DeviceError(f"{where}: module {key!r}: accelerator index {value} is negative")
            try:
                _check_available(torch.device("cuda", value), f"cuda:{value}")
            except DeviceError as exc:
                raise DeviceError(f"{where}: module {key!r}: {exc}") from None
        elif value == "auto":
            raise DeviceError(f"{where}: module {key!r}: 'auto' is a whole device map, not one module's device")
        elif value not in OFFLOAD_TARGETS:
            try:
                resolve_device(value)
            except DeviceError as exc:
                raise DeviceError(f"{where}: module {key!r}: {exc}") from None
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ accelerate's hooks


def _accelerate_hooks(module: nn.Module) -> Iterator[Any]:
    """The module's accelerate hooks (``_hf_hook``, unpacking a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return
    yield from getattr(hook, "hooks", (hook,))


def offload_hook(module: nn.Module, name: str = "weight") -> Any | None:
    """The accelerate hook that materializes ``module``'s own tensor ``name`` for each forward (an
    ``AlignDevicesHook`` with ``offload=True``), or ``None`` when the tensor lives in the module."""
    for hook in _accelerate_hooks(module):
        if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None \
                and name in dict(module.named_parameters(recurse=False)):
            return hook
    return None


def is_offloaded(module: nn.Module, name: str = "weight") -> bool:
    return offload_hook(module, name) is not None


def module_label(module: nn.Module) -> str:
    """A name for error messages: the module's full name when accelerate knows it, else its type and shape."""
    for hook in _accelerate_hooks(module):
        mapping = getattr(hook, "weights_map", None)
        while getattr(mapping, "base", None) is not None:  # under lmaudit's edit overlays
            mapping = mapping.base
        prefix = getattr(mapping, "prefix", None)
        if prefix:
            return f"{prefix.rstrip('.')} ({type(module).__name__})"
    weight = getattr(module, "weight", None)
    shape = f" with weight {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
    return f"{type(module).__name__}{shape}"


def read_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The real values of ``module``'s tensor ``name``, as stored (no transpose).

    A resident tensor is returned itself (writes go through to the model). An offloaded one is read from its
    hook's ``weights_map``, through any edit an intervention has in force: for ``"disk"`` that is a fresh CPU
    copy, for ``"cpu"`` offload the very tensor accelerate keeps in RAM, so callers must only *read* it (edit
    weights through :mod:`lmaudit.checks.core.interventions`). A meta tensor that no hook of the module holds
    (e.g. offloaded by an ancestor through ``preload_module_classes``) is an :class:`OffloadError`.
    """
    hook = offload_hook(module, name)
    if hook is not None:
        return hook.weights_map[name]
    tensor = getattr(module, name)
    if tensor.is_meta:
        raise OffloadError(f"{module_label(module)}: {name} is on the meta device and no accelerate hook of this "
                           "module holds its values (offloaded by an enclosing module?); lmaudit reads and edits "
                           "offloaded weights only through the module's own AlignDevicesHook")
    return tensor


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first real
    parameter or buffer; ``None`` when it has neither (a parameter-free module outside any dispatch)."""
    for hook in _accelerate_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return None


def _stored_on(hook: Any, name: str) -> str:
    """``"cpu"`` when an offloaded tensor sits in RAM, ``"disk"`` when it is read from a file for each use."""
    mapping, key = hook.weights_map, name
    while True:  # unwrap lmaudit's edit overlays and accelerate's PrefixedDataset down to the store
        base = getattr(mapping, "base", None)
        if base is None:
            base = getattr(mapping, "dataset", None)
        if base is None:
            break
        key = f"{getattr(mapping, 'prefix', '')}{key}"
        mapping = base
    state_dict = getattr(mapping, "state_dict", None)  # accelerate's OffloadedWeightsLoader: RAM part, then files
    if isinstance(state_dict, Mapping):
        return "cpu" if key in state_dict else "disk"
    tensor = mapping.get(key) if isinstance(mapping, Mapping) else None
    return str(tensor.device) if isinstance(tensor, torch.Tensor) else "disk"


def stored_where(module: nn.Module) -> str:
    """Where the parameters of ``module`` and its submodules live, from the parameters themselves."""
    places: dict[str, None] = {}
    for sub in module.modules():
        for name, tensor in sub.named_parameters(recurse=False):
            hook = offload_hook(sub, name)
            places[_stored_on(hook, name) if hook is not None else str(tensor.device)] = None
    return ", ".join(places) or "none"


def mapped_device(device_map: Mapping[str, str | int], name: str) -> str | None:
    """The device ``device_map`` gives module ``name``: its own or its closest ancestor's entry, else the
    entries of its children (a layer split over devices reads ``"cpu, disk"``)."""
    owners = [key for key in device_map if key == "" or name == key or name.startswith(f"{key}.")]
    values = ([device_map[max(owners, key=len)]] if owners
              else [v for key, v in device_map.items() if key.startswith(f"{name}.")])
    shown = dict.fromkeys(f"cuda:{v}" if isinstance(v, int) else str(v) for v in values)
    return ", ".join(shown) or None
