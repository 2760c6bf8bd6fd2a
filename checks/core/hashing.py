"""Content hashes: of files (cache keys, cache-entry manifests) and of the weights a model actually holds.

- :func:`sha256_file` reads a whole file (no memo): what a cache entry's full check needs.
- :func:`file_sha256` is the same digest memoized in-process on ``(path, size, mtime)``: a GGUF source file is
  hashed once per process to find its cache entry.
- :func:`state_dict_sha256` identifies a model by its loaded tensors, so one set of weights hashes the same
  whether it came from an alias, a ``.gguf`` file, the HF directory it converts to, or memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from lmaudit.checks.core.errors import LmAuditError

if TYPE_CHECKING:
    import torch
    from torch import nn

_CHUNK = 1 << 22  # 4 MiB reads keep memory flat for multi-GB files
_memo: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of one file's bytes, read in 4 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """:func:`sha256_file`, memoized in-process on (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of the tensors ``model`` holds::

        sha256( for name in sorted(state_dict), skipping a tensor already hashed under an earlier name (tied):
                    f"{name}\\0{dtype}\\0{shape}\\0{nbytes}\\n" + raw bytes (native byte order) )

    Tied tensors (the same parameter under two names, e.g. a tied unembedding) count once, under their first name
    in sorted order. Bytes are hashed through a uint8 view, without a copy, for contiguous CPU tensors; tensors on
    an accelerator are copied to the CPU one at a time, and weights that accelerate offloaded (``meta`` in the
    model) are read back from its offload map, so a model loaded with a ``device_map`` hashes like the same
    weights in memory. Non-persistent buffers (rotary tables) are not part of the state dict and not hashed.
    """
    import torch

    tensors = model.state_dict(keep_vars=True)  # keep_vars: tied names yield the same Parameter object
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name in sorted(tensors):
        tensor = tensors[name]
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        value = _materialize(model, name, tensor)
        digest.update(f"{name}\0{str(value.dtype).removeprefix('torch.')}\0{tuple(value.shape)}\0"
                      f"{value.numel() * value.element_size()}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _materialize(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, contiguous and on the CPU; an offloaded (meta) one read back from its offload map."""
    value = tensor.detach()
    if value.device.type == "meta":
        value = _offloaded_value(model, name).to(value.dtype)
    if value.device.type != "cpu":
        value = value.cpu()
    return value if value.is_contiguous() else value.contiguous()


def _offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """The value accelerate keeps for an offloaded tensor: the ``weights_map`` of the nearest enclosing module's
    ``_hf_hook`` (an ``AlignDevicesHook``, possibly inside a ``SequentialHook``), indexed by the relative name."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        hook = getattr(module, "_hf_hook", None)
        for candidate in getattr(hook, "hooks", (hook,)):
            weights = getattr(candidate, "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[".".join(parts[cut:])]
            except KeyError:
                continue
    raise LmAuditError(f"cannot hash {name}: it is on the meta device and no accelerate offload hook holds its value")
