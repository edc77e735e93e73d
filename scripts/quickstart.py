"""Build k2-tiny, then continue the same K2-format chat prompt greedily with vLLM and with the trainer.

    python scripts/quickstart.py [--out DIR]

Prints both continuations and the logprob gap between the engines (a random model writes noise; the
point is that both engines load the same checkpoint and agree).
"""
import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

from k2rl.model.agreement import vllm_engine_args
from k2rl.model.build import make_model
from k2rl.model.chat import ChatTokenizer
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import completion_logprobs, greedy_decode

TOOLS = [{"type": "function", "function": {"name": "find_order", "description": "Look up an order by id.",
                                           "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/quickstart/model")
    args = parser.parse_args()
    model_dir = make_model("k2-tiny", args.out, seed=0)
    tok = ChatTokenizer(model_dir)
    prompt = tok.encode_conversation([{"role": "user", "content": "Where is my order A123?"}], TOOLS, add_generation_prompt=True)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**vllm_engine_args(model_dir, "float32"))
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                       SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    vllm_ids = list(out.token_ids)

    model = load_model(model_dir).eval()
    trainer_ids = greedy_decode(model, prompt, 24)

    vllm_lp = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, vllm_ids)])
    gap = (completion_logprobs(model, prompt, vllm_ids) - vllm_lp).abs()
    print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    print(f"prompt ({len(prompt)} tokens): {tok.decode(prompt)!r}")
    print(f"vLLM greedy:    {tok.decode(vllm_ids)!r}")
    print(f"trainer greedy: {tok.decode(trainer_ids)!r}")
    print(f"same tokens: {vllm_ids == trainer_ids}; logprob gap mean {gap.mean():.2e}, max {gap.max():.2e}")


if __name__ == "__main__":
    main()
