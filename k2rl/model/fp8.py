"""Block-scaled FP8 (e4m3, 128x128 blocks, `weight_scale_inv` per block) as K2/DeepSeek-V3 ship it."""
from __future__ import annotations

import torch

BLOCK = 128
SCALE_SUFFIX = "_scale_inv"


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               block: int = BLOCK) -> torch.Tensor:
    """W = fp8 * scale_inv, the scale broadcast over each block (edge blocks may be partial)."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for writing FP8 checkpoints: per-block absmax scaled to e4m3's range."""
    rows, cols = weight.shape
    fmax = torch.finfo(torch.float8_e4m3fn).max
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, block, bc, block)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / fmax).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv
