"""The vocabulary projection with fp32 logits from bf16 operands: vLLM's `head_dtype="float32"`.

Why: rounded to bf16, a logit of 10 moves by up to 0.03, and each engine rounds its own (slightly
different) value, so the rounding enters the vLLM-trainer logprob gap, and with it the importance
ratios, twice over (ScaleRL, MiniMax-M1). Both engines must keep the head in fp32: one alone rounds
where the other does not. Accumulating the bf16 products in fp32 costs no more than the bf16 GEMM
(`torch.mm(out_dtype=float32)`, what vLLM runs); the fp32 logits replace the bf16 ones and the fp32
copy the log-softmax made of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _Fp32OutMatmul(torch.autograd.Function):
    """x [N, H] @ w [V, H]^T, low-precision operands, fp32 accumulation and output (CUDA). The backward
    is what autocast's bf16 linear runs: gradients in the operands' dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.to(x.dtype)
        return grad @ w, grad.t() @ x


class Fp32LogitsHead(torch.nn.Module):
    """Holds the lm_head's weight (same parameter, same name); its logits are always fp32."""

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        if dtype == torch.float32:
            return F.linear(hidden.float(), self.weight.float())
        with torch.autocast(device, enabled=False):
            x, w = hidden.to(dtype).flatten(0, -2), self.weight.to(dtype)
            # The CPU has no mixed-dtype GEMM; products of bf16 values are exact in fp32.
            logits = _Fp32OutMatmul.apply(x, w) if x.is_cuda else F.linear(x.float(), w.float())
        return logits.unflatten(0, hidden.shape[:-1])


def use_fp32_logits(model: torch.nn.Module) -> None:
    """Give a causal LM the fp32-logits head (before the optimizer is built: the parameter is kept)."""
    head = model.get_output_embeddings()
    if not isinstance(head, Fp32LogitsHead):
        model.set_output_embeddings(Fp32LogitsHead(head.weight))
