"""How closely vLLM and the trainer agree on the same tokens: the colocation health check.

Samples completions with vLLM, then scores the very same ids with the trainer model; the mean
absolute logprob gap is what `mismatch/logprob_abs` reports during training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from k2rl.model.checkpoint import load_model
from k2rl.model.head import use_fp32_logits
from k2rl.model.modeling import completion_logprobs


@dataclass
class Agreement:
    mean_abs_gap: float
    max_abs_gap: float
    tokens: int


def vllm_engine_args(model_dir, dtype: str, fp32_head: bool = True, **overrides) -> dict:
    """LLM(...) arguments that work for K2-architecture models on this machine (see PLATFORM.md)."""
    from k2rl.engines.rollout import head_dtype_override

    args = dict(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=1024,
                kv_cache_memory_bytes=256 << 20, seed=0, **head_dtype_override(dtype, fp32_head))
    if not torch.cuda.is_available():
        from k2rl.engines.vllm_fixes import patch_cpu_rotary

        patch_cpu_rotary()
    if not torch.cuda.is_available() and dtype == "float32":
        # On CPUs with AMX vLLM picks AMX_MLA, which only takes bf16 weights; the reference CPU MLA
        # backend runs fp32.
        args["attention_backend"] = "CPU_MLA"
    args.update(overrides)
    return args


def measure(model_dir, dtype: str = "float32", prompts: int = 8, tokens: int = 32, seed: int = 0,
            fp32_head: bool = True) -> Agreement:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**vllm_engine_args(model_dir, dtype, fp32_head))
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.get_tokenizer().vocab_size
    batch = [torch.randint(20, vocab, (8,), generator=gen).tolist() for _ in range(prompts)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch],
                        SamplingParams(max_tokens=tokens, temperature=1.0, logprobs=0, seed=seed, ignore_eos=True),
                        use_tqdm=False)
    model = load_model(model_dir, getattr(torch, dtype)).eval()
    if fp32_head:
        use_fp32_logits(model)
    gaps = []
    for prompt, out in zip(batch, outs):
        sample = out.outputs[0]
        vllm_lp = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids)])
        gaps.append((completion_logprobs(model, prompt, list(sample.token_ids)) - vllm_lp).abs())
    gap = torch.cat(gaps)
    return Agreement(gap.mean().item(), gap.max().item(), gap.numel())
