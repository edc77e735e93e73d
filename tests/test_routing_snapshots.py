"""The routing-snapshot patch (k2rl.engines.routing_snapshots): on vLLM 0.26 (GPU) it returns the routing
stock vLLM returns, token for token; on a vLLM that gathers routing at a request's end (0.32, the
CPU's) it leaves the scheduler as it is, or routing replay on a GPU with that vLLM would break."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vllm.v1.core.sched.scheduler import Scheduler

from k2rl.engines.routing_snapshots import copies_every_step, patch_routing_snapshots

REPO = Path(__file__).resolve().parents[1]
# One vLLM per process (a second engine in a process fails), plain vLLM as a user starts it, stock or
# patched. Few sequences at once and small prefill chunks: prompts prefill over several steps while
# others decode, and requests join as others finish, the schedule the snapshots serve.
GENERATE = """
import sys
import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from k2rl.engines.routing_snapshots import patch_routing_snapshots

model_dir, mode, out = sys.argv[1:]
if mode == "patched":
    assert patch_routing_snapshots(), "this vLLM's scheduler has no per-step copies to patch"
llm = LLM(model=model_dir, dtype="bfloat16", seed=0, enforce_eager=True, max_model_len=512,
          kv_cache_memory_bytes=1 << 30, enable_return_routed_experts=True, max_num_seqs=8,
          max_num_batched_tokens=64, enable_chunked_prefill=True)
prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 900 + 5 for j in range(3 + 29 * (i % 7))])
           for i in range(24)]
params = [SamplingParams(temperature=0, max_tokens=8 + 5 * (i % 6), detokenize=False) for i in range(24)]
outputs = llm.generate(prompts, params, use_tqdm=False)
assert all(o.outputs[0].routed_experts is not None for o in outputs), "vLLM returned no routing"
np.savez(out, prompt_lens=[len(p["prompt_token_ids"]) for p in prompts],
         **{f"tokens_{i}": np.array(o.outputs[0].token_ids) for i, o in enumerate(outputs)},
         **{f"routed_{i}": o.outputs[0].routed_experts for i, o in enumerate(outputs)})
"""


@pytest.mark.gpu
def test_patched_scheduler_returns_stock_routing(gpu_model_dir, tmp_path):
    if not copies_every_step(Scheduler):
        pytest.skip("this vLLM's scheduler has no per-step copies (vLLM 0.32 gathers routing at a request's end)")
    runs = {}
    for mode in ("stock", "patched"):
        out = tmp_path / f"{mode}.npz"
        subprocess.run([sys.executable, "-c", GENERATE, str(gpu_model_dir), mode, str(out)], check=True, timeout=600,
                       cwd=REPO, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # the patch is in-process
        runs[mode] = np.load(out)
    stock, patched = runs["stock"], runs["patched"]
    for i in range(len(stock["prompt_lens"])):
        assert np.array_equal(stock[f"tokens_{i}"], patched[f"tokens_{i}"]), i
        # a row per position vLLM ran: the prompt's (read from the slot buffer) and each decoded token's
        positions = stock["prompt_lens"][i] + len(stock[f"tokens_{i}"])
        assert len(patched[f"routed_{i}"]) in (positions - 1, positions), i
        assert np.array_equal(stock[f"routed_{i}"], patched[f"routed_{i}"]), i


def test_leaves_a_scheduler_without_per_step_copies_alone():
    stock = Scheduler._update_after_schedule
    if copies_every_step(Scheduler):
        pytest.skip("this vLLM's scheduler copies block ids every step (0.26): the GPU test above covers the patch")
    assert patch_routing_snapshots() is False
    assert Scheduler._update_after_schedule is stock
