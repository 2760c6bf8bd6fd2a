"""Fast NaN/inf detection for activations and logits, and the words that describe what was found.

:func:`all_finite` decides with one float32 sum instead of ``isfinite(t).all()``: IEEE arithmetic carries any NaN
into the sum, and any inf into an inf or a NaN, so a finite sum proves every element finite. The sum reads the
tensor once and allocates nothing, where ``isfinite`` writes a bool tensor of the same size first: measured on
this project's 2-core CPU, 0.03 ms instead of 1.8 ms for a (4, 257, 576) hidden state and 11 ms instead of 275 ms
for (4, 257, 49152) logits (one thread). A non-finite sum of finite values (an overflow past 3.4e38) is the one
false alarm; it is ruled out by the exact test before anything is reported.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def all_finite(tensor: Tensor) -> bool:
    """True when no element of ``tensor`` is NaN or ±inf (exact; see the module docstring)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())  # the sum overflowed or saw a non-finite: settle it exactly


def count_nonfinite(tensor: Tensor) -> tuple[int, int]:
    """``(n_nan, n_inf)`` in ``tensor``."""
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    return n_nan, n_inf


def describe_nonfinite(tensor: Tensor) -> str:
    """``"12 NaN / 0 inf of 224 values"``."""
    n_nan, n_inf = count_nonfinite(tensor)
    return f"{n_nan} NaN / {n_inf} inf of {tensor.numel()} values"


def nonfinite_parameters(module: nn.Module, prefix: str) -> list[str]:
    """``"<prefix>.<name> (1 NaN / 0 inf)"`` for each parameter or buffer of ``module`` holding a NaN or an inf.
    Offloaded (meta) tensors are skipped: their values are not in memory."""
    found = []
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.device.type == "meta" or all_finite(tensor.detach()):
            continue
        n_nan, n_inf = count_nonfinite(tensor.detach())
        found.append(f"{prefix}.{name} ({n_nan} NaN / {n_inf} inf)" if prefix else f"{name} ({n_nan} NaN / {n_inf} inf)")
    return found
