"""Is the model under audit already quantized? Whether its decoder weights lie on a low-bit grid per block.

A model distributed as GGUF Q4_0 / Q4_1 / Q4_K / IQ4 and dequantized to float (as the default model is:
``SmolLM2-135M-Instruct.Q4_1.gguf``) keeps the grid of its file: every block of 32 consecutive elements of a
weight row takes at most 16 distinct values. Round-to-nearest at that grid's own block then reproduces the
weights (exactly, for Q4_1's asymmetric min-max blocks), so a 4-bit RTN audit at B = 32 measures nothing, and at
other block sizes it measures re-quantization of an already 4-bit model, not quantization of a float one. The
audit reports this finding beside its results instead of trusting the model's name.

For blocks X of ``block_size`` contiguous elements of each decoder Linear's flattened ``[out, in]`` weight
(along the rows, as GGUF lays its blocks out), with ``levels = 2^bits``::

    share_on_grid   = #{X : |distinct values of X| ≤ levels} / #X
    rtn_exact_share = #{w : Q⁻¹(Q(w)) == w, asymmetric min-max RTN per block X} / #w

A float model has ``share_on_grid`` ≈ 0 (32 random floats are 32 distinct values); a Q4 GGUF one has 1.
At most ``max_blocks_per_linear`` evenly spaced blocks per Linear are read, which bounds the cost (about 0.1 s
for a 135M model) without missing a grid that covers every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmaudit.checks.core.adapter import ArchitectureAdapter
from lmaudit.checks.quantization.quantizers import Granularity, QuantSpec, Scheme, fake_quantize

__all__ = ["GGUF_BLOCK", "ON_GRID_SHARE", "WeightGrid", "detect_weight_grid"]

GGUF_BLOCK = 32  # elements per block of GGUF's Q4_0/Q4_1/Q5_*/Q8_0 and of Q4_K's sub-blocks
ON_GRID_SHARE = 0.99  # a grid that covers (nearly) every block; a float model is at ~0


@dataclass(frozen=True)
class WeightGrid:
    """What :func:`detect_weight_grid` found; plain data for the report (``finding`` says it in one sentence)."""

    block_size: int
    bits: int
    share_on_grid: float  # share of the blocks read with at most 2^bits distinct values
    rtn_exact_share: float  # share of the weights read that bits-bit min-max RTN at block_size leaves unchanged
    blocks_read: int
    linears: int
    on_grid: bool  # share_on_grid ≥ ON_GRID_SHARE: the model was quantized before
    finding: str

    @classmethod
    def of(cls, block_size: int, bits: int, share_on_grid: float, rtn_exact_share: float, blocks_read: int,
           linears: int) -> WeightGrid:
        on_grid = share_on_grid >= ON_GRID_SHARE
        if not on_grid:
            finding = (f"The decoder weights are not on a {bits}-bit grid per {block_size}-element block "
                       f"({100 * share_on_grid:.1f} % of {blocks_read} blocks read are): a float model.")
        else:
            finding = (f"The decoder weights were already quantized: {100 * share_on_grid:.1f} % of {blocks_read} "
                       f"blocks of {block_size} elements hold at most {2 ** bits} distinct values (e.g. dequantized "
                       f"from a GGUF Q{bits} file), and {bits}-bit RTN at B = {block_size} leaves "
                       f"{100 * rtn_exact_share:.2f} % of the weights unchanged. So {bits}-bit RTN at "
                       f"B = {block_size} measures (almost) nothing, and every other block size measures "
                       f"re-quantization of a {bits}-bit model, not quantization of a float one.")
        return cls(block_size, bits, share_on_grid, rtn_exact_share, blocks_read, linears, on_grid, finding)


def _sample_blocks(weight: torch.Tensor, block_size: int, max_blocks: int) -> torch.Tensor:
    """``(n, block_size)``: up to ``max_blocks`` evenly spaced full blocks of the flattened weight."""
    flat = weight.detach().reshape(-1)
    n_full = flat.numel() // block_size
    blocks = flat[: n_full * block_size].view(n_full, block_size)  # (n_full, block_size)
    if n_full > max_blocks:
        blocks = blocks[torch.linspace(0, n_full - 1, max_blocks).long()]
    return blocks.float()


@torch.no_grad()
def detect_weight_grid(
    adapter: ArchitectureAdapter, *, block_size: int = GGUF_BLOCK, bits: int = 4, max_blocks_per_linear: int = 256,
) -> WeightGrid:
    """Measure whether the decoder Linears' weights already lie on a ``bits``-bit grid per ``block_size`` block
    (module docstring for the two shares)."""
    spec = QuantSpec(bits, Scheme.ASYMMETRIC, Granularity.PER_CHANNEL)  # one scale per row = per block
    on_grid = exact = weights = blocks_read = 0
    linears = adapter.decoder_linears()
    for module in linears.values():
        blocks = _sample_blocks(adapter.weight(module), block_size, max_blocks_per_linear)  # (n, block_size)
        if not len(blocks):
            continue
        ordered = blocks.sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1  # (n,)
        on_grid += int((distinct <= 2**bits).sum())
        exact += int((fake_quantize(blocks, spec) == blocks).sum())
        weights += blocks.numel()
        blocks_read += len(blocks)
    return WeightGrid.of(block_size, bits, on_grid / max(1, blocks_read), exact / max(1, weights), blocks_read,
                         len(linears))
