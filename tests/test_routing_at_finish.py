"""The routing-at-finish patch (k2rl.engines.routing_at_finish): on vLLM 0.26 (GPU) it returns the
routing stock vLLM returns, token for token, for every request that was not preempted, and a full,
written row per position for those that were; vLLM 0.26's own scheduler, patched, returns every
position's routing through preemptions, also for a request preempted at its last step; on a vLLM that
gathers routing at a request's end (0.32, the CPU's) it leaves the scheduler as it is, or routing
replay on a GPU with that vLLM would break."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vllm.v1.core.sched.scheduler import Scheduler

from k2rl.engines.routing_at_finish import PATCHED_METHODS, patch_routing_at_finish, reads_routing_per_step

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from scheduler_stand_in import drive, make_scheduler  # noqa: E402
# One vLLM per process (a second engine in a process fails), plain vLLM as a user starts it, stock or
# patched. Few sequences at once and small prefill chunks: prompts prefill over several steps while
# others decode, and requests join as others finish. A KV cache of KV_TOKENS positions, below what the
# 8 running requests grow to: some are preempted and recomputed.
KV_TOKENS = 640
GENERATE = """
import json, sys
import numpy as np
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.core.sched.scheduler import Scheduler
from k2rl.engines.routing_at_finish import patch_routing_at_finish

model_dir, mode, kv_tokens, out = sys.argv[1:]
if mode == "patched":
    assert patch_routing_at_finish(), "this vLLM's scheduler does not slice routing per step"
preempted = []  # the prompts of preempted requests (to tell them apart from the others)
preempt = Scheduler._preempt_request
def counted(self, request, timestamp):
    preempted.append(request.prompt_token_ids[:3])
    preempt(self, request, timestamp)
Scheduler._preempt_request = counted
config = json.load(open(f"{model_dir}/config.json"))
bytes_per_position = 2 * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * config["num_hidden_layers"]
llm = LLM(model=model_dir, dtype="bfloat16", seed=0, enforce_eager=True, max_model_len=256,
          kv_cache_memory_bytes=int(kv_tokens) * bytes_per_position, enable_return_routed_experts=True,
          max_num_seqs=8, max_num_batched_tokens=64, enable_chunked_prefill=True)
prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 900 + 5 for j in range(3 + 29 * (i % 7))])
           for i in range(24)]
params = [SamplingParams(temperature=0, max_tokens=8 + 5 * (i % 6), detokenize=False) for i in range(24)]
outputs = llm.generate(prompts, params, use_tqdm=False)
assert all(o.outputs[0].routed_experts is not None for o in outputs), "vLLM returned no routing"
np.savez(out, prompt_lens=[len(p["prompt_token_ids"]) for p in prompts],
         preempted=[any(p["prompt_token_ids"][:3] == q for q in preempted) for p in prompts],
         **{f"tokens_{i}": np.array(o.outputs[0].token_ids) for i, o in enumerate(outputs)},
         **{f"routed_{i}": o.outputs[0].routed_experts for i, o in enumerate(outputs)})
"""


@pytest.mark.gpu
def test_patched_scheduler_returns_stock_routing(gpu_model_dir, tmp_path):
    if not reads_routing_per_step(Scheduler):
        pytest.skip("this vLLM's scheduler does not slice routing per step (vLLM 0.32 gathers it at a request's end)")
    runs = {}
    for mode in ("stock", "patched"):
        out = tmp_path / f"{mode}.npz"
        subprocess.run([sys.executable, "-c", GENERATE, str(gpu_model_dir), mode, str(KV_TOKENS), str(out)],
                       check=True, timeout=600, cwd=REPO,
                       env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})  # the patch is in-process
        runs[mode] = np.load(out)
    stock, patched = runs["stock"], runs["patched"]
    preempted = stock["preempted"]
    assert np.array_equal(preempted, patched["preempted"])  # the same schedule
    assert 0 < preempted.sum() < len(preempted), "the KV cache should force some preemptions, not all"
    config = json.loads((gpu_model_dir / "config.json").read_text())
    moe = slice(config["first_k_dense_replace"], None)
    agree = []
    for i in range(len(stock["prompt_lens"])):
        assert np.array_equal(stock[f"tokens_{i}"], patched[f"tokens_{i}"]), i
        positions = stock["prompt_lens"][i] + len(stock[f"tokens_{i}"]) - 1  # all but the last sampled token
        assert len(patched[f"routed_{i}"]) == len(stock[f"routed_{i}"]) == positions, i
        if not preempted[i]:
            assert np.array_equal(stock[f"routed_{i}"], patched[f"routed_{i}"]), i
            continue
        # recomputed: every row read from a slot written for it (an unwritten one is all zeros, the
        # same expert twice), the same experts as the sampling pass bar near-ties
        experts = np.sort(patched[f"routed_{i}"][:, moe], axis=-1)
        assert (np.diff(experts, axis=-1) > 0).all(), i
        agree.append((stock[f"routed_{i}"][:, moe] == patched[f"routed_{i}"][:, moe]).mean())
    print(f"\n{int(preempted.sum())} of {len(preempted)} requests preempted; their recomputed routing agrees "
          f"with the sampling pass's on {np.mean(agree):.4f} of (position, layer, k) entries")


def route(rid: str, position: int, config) -> np.ndarray:
    """The stand-in runner's routing of one position: distinct experts per layer, a function of
    (request, position), so a recompute routes alike and each row tells where it was read from."""
    rng = np.random.default_rng((int(rid), position))
    return np.stack([rng.choice(config.n_routed_experts, config.num_experts_per_tok, replace=False)
                     for _ in range(config.num_hidden_layers)])


@pytest.mark.gpu  # the only vLLM this applies to (0.26) is the device's; no GPU work
@pytest.mark.parametrize("num_blocks,shift", [(16, 2), (26, 6), (40, 0)])
def test_patched_scheduler_reads_every_position_through_preemptions(gpu_model_dir, monkeypatch, num_blocks, shift):
    if not reads_routing_per_step(Scheduler):
        pytest.skip("this vLLM's scheduler does not slice routing per step (vLLM 0.32 gathers it at a request's end)")
    for name in PATCHED_METHODS:
        monkeypatch.setattr(Scheduler, name, getattr(Scheduler, name))  # the stock methods back after the test
    assert patch_routing_at_finish()
    # 24 requests, 8 running at once in `num_blocks` blocks of 16 positions, 64-token prefill chunks
    scheduler = make_scheduler(gpu_model_dir, max_running=8, max_batched_tokens=64, num_blocks=num_blocks,
                               max_model_len=256)
    config = scheduler.vllm_config.model_config.hf_config
    prompts = [[(7 * i + 13 * j) % 900 + 5 for j in range(3 + 29 * (i % 7))] for i in range(24)]
    max_tokens = [8 + (5 + shift) * ((i + shift) % 6) for i in range(24)]
    run = drive(scheduler, prompts, max_tokens, lambda spans: np.concatenate([
        np.stack([route(rid, p, config) for p in range(first, first + count)]) for rid, first, count in spans]))
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        rid = str(i)
        assert len(run.rows[rid]) == 1, rid  # once, as it finished
        want = np.stack([route(rid, p, config) for p in range(len(prompt) + n - 1)])  # all but the last token
        assert np.array_equal(run.rows[rid][0], want), rid
    assert run.preempted, "the KV blocks should force preemptions"
    if num_blocks < 40:  # these two schedules preempt one request at its last step (kept block ids)
        assert run.finished_preempted, "no request finished while preempted"


def test_leaves_a_scheduler_that_gathers_routing_at_the_end_alone():
    stock = {name: getattr(Scheduler, name, None) for name in PATCHED_METHODS}
    if reads_routing_per_step(Scheduler):
        pytest.skip("this vLLM's scheduler slices routing per step (0.26): the GPU test above covers the patch")
    assert patch_routing_at_finish() is False
    assert all(getattr(Scheduler, name, None) is method for name, method in stock.items())
