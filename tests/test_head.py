"""fp32 logits from a bf16 model in both engines (k2rl.model.head, vLLM's head_dtype): the trainer's head
keeps its parameter and fp32 behaviour, returns the exact fp32 products of the bf16 operands, and
vLLM's logits come off the bf16 grid and match the trainer's."""
import os

import pytest
import torch
import torch.nn.functional as F

from k2rl.config import JobConfig
from k2rl.engines.train import TrainEngine
from k2rl.model.agreement import vllm_engine_args
from k2rl.model.checkpoint import load_model
from k2rl.model.head import Fp32LogitsHead, use_fp32_logits


def _hidden(model, n=6, seed=0):
    return torch.randn(2, n, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _on_bf16_grid(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float() == x


def test_fp32_model_is_unchanged_and_keeps_its_parameter(tiny_model_dir):
    model = load_model(tiny_model_dir)
    linear, names = model.lm_head, list(model.state_dict())
    use_fp32_logits(model)
    assert isinstance(model.lm_head, Fp32LogitsHead) and model.lm_head.weight is linear.weight
    assert list(model.state_dict()) == names
    h = _hidden(model)
    torch.testing.assert_close(model.lm_head(h), linear(h), rtol=0, atol=0)


def test_bf16_autocast_gives_exact_fp32_products_and_gradients(tiny_model_dir):
    model = load_model(tiny_model_dir)
    linear = model.lm_head
    use_fp32_logits(model)
    h = _hidden(model).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.lm_head(h)
        rounded = linear(h)
    exact = h.detach().bfloat16().double() @ linear.weight.detach().bfloat16().double().t()
    assert logits.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(logits.double(), exact, rtol=1e-6, atol=1e-6)
    assert not _on_bf16_grid(logits).all() and (rounded.double() - exact).abs().max() > 1e-4
    logits.logsumexp(-1).sum().backward()
    assert linear.weight.grad.dtype == torch.float32 and linear.weight.grad.abs().sum() > 0
    grad_h = h.grad.clone()
    h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(h).float().logsumexp(-1).sum().backward()
    torch.testing.assert_close(grad_h, h.grad, rtol=2e-2, atol=1e-3)


def test_bf16_weights_without_autocast_give_fp32_logits(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.bfloat16)
    use_fp32_logits(model)
    h = _hidden(model).bfloat16()
    logits = model.lm_head(h)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(h.float(), model.lm_head.weight.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fp32_head", [True, False])
def test_train_engine_follows_the_setting(tiny_model_dir, world_of_one, fp32_head):
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-3}, model={"fp32_head": fp32_head})
    engine = TrainEngine(tiny_model_dir, job)
    assert isinstance(engine.model.lm_head, Fp32LogitsHead) == fp32_head


def test_vllm_bf16_logits_come_off_the_grid_and_match_the_trainer(tiny_model_dir):
    """vLLM's raw logits of the sampled tokens under head_dtype=float32 are not bf16 values, and equal the
    trainer's fp32-head logits of the same bf16 model up to the bf16 rounding of the layers below."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**vllm_engine_args(tiny_model_dir, "bfloat16", logprobs_mode="raw_logits"))
    assert llm.llm_engine.model_config.head_dtype == torch.float32
    prompt = [5, 6, 7, 8, 9, 10]
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                       SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, seed=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    vllm_logits = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, out.token_ids)])
    model = load_model(tiny_model_dir, torch.bfloat16).eval()
    use_fp32_logits(model)
    ids = torch.tensor([prompt + list(out.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]
    trainer_logits = logits.gather(-1, ids[0, len(prompt):, None])[:, 0]
    assert not _on_bf16_grid(vllm_logits).all()
    torch.testing.assert_close(vllm_logits, trainer_logits, rtol=0, atol=0.05)


def test_rollout_engine_asks_vllm_for_the_fp32_head(tiny_model_dir):
    from k2rl.engines.rollout import RolloutEngine, head_dtype_override

    assert head_dtype_override("float32", True) == {} and head_dtype_override("bfloat16", False) == {}
    engine = RolloutEngine(tiny_model_dir, dtype="bfloat16", max_model_len=256)
    assert engine.llm.llm_engine.model_config.head_dtype == torch.float32


@pytest.mark.gpu
def test_cuda_head_accumulates_bf16_products_in_fp32(tiny_model_dir):
    model = load_model(tiny_model_dir).cuda()
    linear = model.lm_head
    use_fp32_logits(model)
    h = _hidden(model, n=512).cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model.lm_head(h)
    exact = h.detach().bfloat16().double() @ linear.weight.detach().bfloat16().double().t()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)
    logits.logsumexp(-1).sum().backward()
    grad_h, grad_w = h.grad.clone(), linear.weight.grad.clone()
    h.grad, linear.weight.grad = None, None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        linear(h).float().logsumexp(-1).sum().backward()
    torch.testing.assert_close(grad_h, h.grad, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(grad_w, linear.weight.grad, rtol=2e-2, atol=1e-3)
