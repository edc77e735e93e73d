"""TrainEngine on real DeepSpeed (CPU, gloo, a world of one): logprobs, a step, export, checkpoints."""
import re

import pytest
import torch

from k2rl.config import JobConfig, OptimizerConfig
from k2rl.engines.train import TrainEngine, lr_multiplier
from k2rl.engines.types import ROUTED_EXPERTS, TokenBatch, add_routing, is_routed_expert
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import export_weights, to_checkpoint_names
from k2rl.model.routing import own_routing

from conftest import nll

EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")  # one expert's matrix, checkpoint name
SEQS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]


@pytest.fixture(scope="module")
def engine(tiny_model_dir, world_of_one):
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-2}, train={"zero_stage": 1, "micro_batch_tokens": 16})
    return TrainEngine(tiny_model_dir, job)


def test_lr_warms_up_then_decays_to_the_floor():
    cosine = lr_multiplier(OptimizerConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1), total_steps=110)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [cosine(s) for s in (10, 60, 110, 500)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    linear = lr_multiplier(OptimizerConfig(decay="linear", min_lr_ratio=0.0), total_steps=100)
    assert [linear(s) for s in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    assert lr_multiplier(OptimizerConfig(), total_steps=100)(99) == 1.0  # constant: the default


def test_micro_batches_respect_token_budget():
    batch = TokenBatch.from_lists(SEQS, advantages=[[1.0] * len(s) for s in SEQS])
    mbs = batch.micro_batches(11)
    assert [[len(s) for s in mb.input_ids] for mb in mbs] == [[6], [3], [8]]
    assert [len(s) for s in batch.micro_batches(16)[0].input_ids] == [6, 3]
    assert batch.shard(1, 2).input_ids[0].tolist() == SEQS[1] and len(mbs[2].token_data["advantages"][0]) == 8


def test_logprobs_match_the_model(engine, tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    got = engine.logprobs(TokenBatch.from_lists(SEQS))
    for seq, lp in zip(SEQS, got):
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert lp.shape == (len(seq),) and lp[0] == 0
        torch.testing.assert_close(lp[1:], ref, atol=1e-4, rtol=0)


def test_export_buckets_are_bounded_and_complete(engine, tiny_model_dir):
    bucket_bytes = 200_000
    buckets = list(engine.export_weights(bucket_bytes))
    assert len(buckets) > 3
    ref = dict(export_weights(load_model(tiny_model_dir)))
    got = {n: t for bucket in buckets for n, t in bucket}
    assert got.keys() == ref.keys()
    torch.testing.assert_close(got, ref)  # before any step the weights are the checkpoint's


def test_export_selects_parameters_by_name(engine):
    full = {n for bucket in engine.export_weights(200_000) for n, _ in bucket}
    experts = {n for bucket in engine.export_weights(200_000, select=is_routed_expert) for n, _ in bucket}
    rest = {n for bucket in engine.export_weights(200_000, select=lambda n: not is_routed_expert(n)) for n, _ in bucket}
    assert experts and rest and experts.isdisjoint(rest) and experts | rest == full
    assert all(EXPERT.search(n) for n in experts) and not any(EXPERT.search(n) for n in rest)


def test_export_in_rollout_dtype_casts_each_bucket_into_one_buffer(engine, tiny_model_dir):
    bucket_bytes = 100_000
    buckets = list(engine.export_weights(bucket_bytes, torch.bfloat16))
    ref = dict(export_weights(load_model(tiny_model_dir)))
    got = {n: t for bucket in buckets for n, t in bucket}
    assert got.keys() == ref.keys()
    for name, tensor in got.items():
        keep = name.endswith("e_score_correction_bias")  # vLLM holds the router bias in fp32
        assert tensor.dtype == (torch.float32 if keep else torch.bfloat16), name
        torch.testing.assert_close(tensor, ref[name].to(tensor.dtype), rtol=0, atol=0)
    live = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    largest = max(p.numel() * 2 for p in engine.model.parameters())  # a bigger weight goes alone
    for bucket in buckets:
        storages = {t.untyped_storage().data_ptr() for _, t in bucket}
        assert not storages & live  # copies, not the live fp32 weights
        assert len(storages) <= 2  # one flat buffer per dtype in the bucket
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= max(bucket_bytes, largest)


def test_expert_stacks_are_the_live_fused_experts(engine):
    """What a direct expert copy into vLLM reads: each MoE layer's two fused stacks as views of the
    trainer's own weights (no copy, no cast), together exactly the routed experts the export names."""
    stacks = dict(engine.expert_stacks())
    live = dict(engine.model.named_parameters())
    assert stacks and {n.rsplit(".", 1)[1] for n in stacks} == {"gate_up_proj", "down_proj"}
    for name, stack in stacks.items():
        assert stack.data_ptr() == live[name].data_ptr() and stack.dtype == live[name].dtype == torch.float32
    exported = {n: t for bucket in engine.export_weights(1 << 30, select=is_routed_expert) for n, t in bucket}
    per_expert = dict(to_checkpoint_names(stacks.items()))
    assert per_expert.keys() == exported.keys()
    assert all(torch.equal(t, exported[n]) for n, t in per_expert.items())


def test_train_step_learns_and_checkpoint_round_trips(engine, tmp_path):
    batch = TokenBatch.from_lists(SEQS)
    before = sum(float(lp.sum()) for lp in engine.logprobs(batch))
    stats = [engine.train_step(batch, nll) for _ in range(3)]
    after = sum(float(lp.sum()) for lp in engine.logprobs(batch))
    assert after > before + 1.0, (before, after)
    assert stats[-1]["tokens"] > 0 and stats[-1]["grad_norm"] > 0 and stats[-1]["attn/max_logit"] > 0
    assert stats[-1]["moe/max_load"] >= 1 and stats[-1]["moe/idle_experts"] >= 0
    assert stats[-1]["loss"] < stats[0]["loss"]

    engine.save_checkpoint(tmp_path / "ckpt")
    saved = engine.logprobs(batch)
    engine.train_step(batch, nll)
    engine.load_checkpoint(tmp_path / "ckpt")
    for a, b in zip(saved, engine.logprobs(batch)):
        torch.testing.assert_close(a, b)
    reloaded = load_model(tmp_path / "ckpt")  # the HF layout half is a plain model directory
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    torch.testing.assert_close(dict(export_weights(reloaded)), {n: t for b in engine.export_weights(1 << 30) for n, t in b})


def test_offloaded_engine_refuses_work(engine):
    engine.offload()
    assert not engine.holds_device_memory()
    with pytest.raises(RuntimeError, match="reload"):
        engine.logprobs(TokenBatch.from_lists(SEQS))
    engine.reload()
    assert len(engine.logprobs(TokenBatch.from_lists(SEQS))) == 3


def test_muonclip_under_zero0_clips_heads(engine, tiny_model_dir):
    """The default optimizer (k2rl.optim's MuonClip, ZeRO 0): a step reports grad norm and QK-Clip."""
    job = JobConfig(optimizer={"name": "muonclip", "lr": 1e-2, "qk_clip_tau": 0.05}, train={"zero_stage": 0})
    muon = TrainEngine(tiny_model_dir, job)  # joins the world the `engine` fixture set up
    stats = muon.train_step(TokenBatch.from_lists(SEQS), nll)
    assert stats["grad_norm"] > 0 and stats["attn/clipped_heads"] > 0 and 0 < stats["attn/max_logit"]


def test_balancing_moves_the_router_bias_that_sync_and_checkpoints_carry(tiny_model_dir, world_of_one, tmp_path):
    """optimizer.router_bias_update: each step moves every selection bias by exactly the rate, and the
    moved bias is what the trainer exports to vLLM and restores from a checkpoint."""
    rate = 0.01
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-3, "router_bias_update": rate}, train={"zero_stage": 0})
    engine = TrainEngine(tiny_model_dir, job)

    def biases():
        return {n: t.clone() for bucket in engine.export_weights(1 << 30) for n, t in bucket
                if n.endswith("e_score_correction_bias")}

    before = biases()
    engine.train_step(TokenBatch.from_lists(SEQS), nll)
    moved = biases()
    assert before.keys() == moved.keys() and before
    for name, bias in moved.items():
        step = (bias - before[name]).abs()
        assert torch.allclose(step[step > 0], torch.tensor(rate)) and (step > 0).any(), name
    engine.save_checkpoint(tmp_path / "ckpt")
    engine.train_step(TokenBatch.from_lists(SEQS), nll)
    engine.load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(moved[n], b) for n, b in biases().items())


def test_k2_update_favours_the_better_samples_of_each_group(tiny_model_dir, world_of_one):
    """The RL direction end to end (Objective -> TrainEngine -> MuonClip, shared prompt run once, PTX rows
    mixed in): after one step, sum_i A_i * (change in log pi(y_i)) > 0 and the group's better samples
    gained on its worse ones. A flipped sign or misaligned advantages anywhere on the path fails it."""
    from k2rl.config import AlgorithmConfig
    from k2rl.loop.objective import Objective

    job = JobConfig(optimizer={"name": "muonclip", "lr": 1e-3}, train={"zero_stage": 0})
    engine = TrainEngine(tiny_model_dir, job)
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(5, 4000, (20,), generator=gen).tolist()  # every dialog's opening: the shared prefix
    prompts = [system + torch.randint(5, 4000, (4,), generator=gen).tolist() for _ in range(2)]
    seqs = [p + torch.randint(5, 4000, (10,), generator=gen).tolist() for p in prompts for _ in range(4)]
    masks = [[False] * 24 + [True] * 10 for _ in seqs]
    rewards = torch.tensor([[1.5, 0.0, 0.0, 1.5], [0.0, -1.0, 1.5, 0.0]])
    adv = (rewards - rewards.mean(1, keepdim=True)).flatten()
    ptx = TokenBatch.from_lists([system + torch.randint(5, 4000, (10,), generator=gen).tolist()], [[False] * 20 + [True] * 10])
    batch = TokenBatch.from_lists(seqs + ptx.input_ids, masks + ptx.loss_mask)
    batch.seq_data = {"advantages": torch.cat([adv, torch.zeros(1)]), "ptx": torch.tensor([0.0] * 8 + [1.0])}
    assert engine._shared_prefix(batch) == 20
    algo = AlgorithmConfig(name="k2", tau=0.1, ptx_coef=0.5, ptx_dataset="oracle")

    def sequence_logprobs():
        return torch.stack([lp[24:].sum() for lp in engine.logprobs(batch)[:8]])

    before = sequence_logprobs()
    engine.train_step(batch, Objective(algo))
    change = sequence_logprobs() - before
    assert float((adv * change).sum()) > 0
    assert change[adv > 0].mean() > change[adv < 0].mean()


def test_reference_policy_stays_frozen(tiny_model_dir, world_of_one):
    """The KL anchor: logprobs of the initial weights, whatever the policy has learned since."""
    job = JobConfig(optimizer={"name": "adamw", "lr": 1e-2}, algorithm={"name": "grpo", "kl_coef": 0.1})
    engine = TrainEngine(tiny_model_dir, job, reference_dir=tiny_model_dir)
    batch = TokenBatch.from_lists(SEQS)
    before = engine.reference_logprobs(batch)
    torch.testing.assert_close(torch.cat(engine.logprobs(batch)), torch.cat(before))
    engine.train_step(batch, nll)
    assert not torch.allclose(torch.cat(engine.logprobs(batch)), torch.cat(before))
    torch.testing.assert_close(torch.cat(engine.reference_logprobs(batch)), torch.cat(before), rtol=0, atol=0)


def test_logprobs_and_step_replay_the_batch_routing(engine):
    """Routing replay through the engine: micro-batches pad the routing rows like the ids."""
    model, experts = engine.model, engine.model.config.n_routed_experts
    batch = TokenBatch.from_lists(SEQS)
    base = engine.logprobs(batch)
    add_routing(batch, [own_routing(model, torch.tensor([s]))[0].to(torch.int16) for s in SEQS])
    assert all(torch.equal(a, b) for a, b in zip(engine.logprobs(batch), base))
    batch.token_data[ROUTED_EXPERTS] = [(r + 1) % experts for r in batch.token_data[ROUTED_EXPERTS]]
    assert not any(torch.allclose(a[1:], b[1:]) for a, b in zip(engine.logprobs(batch), base))
    assert engine.train_step(batch, nll)["grad_norm"] > 0


def test_a_world_of_one_skips_the_gradient_all_reduce_and_steps_the_same(tiny_model_dir, world_of_one):
    """DeepSpeed's all-reduce over a single rank only copies gradients out and back: skipping it
    (ZeRO 0) leaves the step bit for bit what it was."""
    job = JobConfig(optimizer={"name": "muonclip", "lr": 1e-2}, train={"zero_stage": 0})
    batch = TokenBatch.from_lists(SEQS)
    skipping, reducing = TrainEngine(tiny_model_dir, job), TrainEngine(tiny_model_dir, job)
    assert not skipping.engine.enable_backward_allreduce
    reducing.engine.enable_backward_allreduce = True  # DeepSpeed's own path, as a reference
    for engine in (skipping, reducing):
        engine.train_step(batch, nll)
        engine.train_step(batch, nll)
    for (name, a), (_, b) in zip(skipping.model.named_parameters(), reducing.model.named_parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(skipping.model.model.embed_tokens.weight, load_model(tiny_model_dir).model.embed_tokens.weight)
