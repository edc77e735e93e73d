"""A prefix every sequence shares, run once (k2rl.model.shared_prefix): the same logprobs, gradients,
max attention logits and replayed routing as the plain batched pass; and the TrainEngine uses it."""
import pytest
import torch

from k2rl.config import JobConfig
from k2rl.engines.train import TrainEngine
from k2rl.engines.types import ROUTED_EXPERTS, TokenBatch
from k2rl.model.checkpoint import load_model
from k2rl.model.modeling import head_max_logits, reset_max_logits
from k2rl.model.routing import own_routing, replay_routing
from k2rl.model.shared_prefix import MIN_SHARED_TOKENS, padded_logprobs, shared_prefix_length

from conftest import nll

PREFIX = 40


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir).train()


def opening_alike(vocab: int, lengths=(PREFIX + 9, PREFIX + 3, PREFIX + 17)) -> list[torch.Tensor]:
    """Sequences with the same first PREFIX tokens, then their own (the first own token differs)."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(20, vocab, (PREFIX,), generator=g)
    return [torch.cat([prefix, torch.tensor([20 + i]), torch.randint(20, vocab, (n - PREFIX - 1,), generator=g)])
            for i, n in enumerate(lengths)]


def padded(seqs):
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()


def loss_and_grads(model, logp, attn):
    model.zero_grad(set_to_none=True)
    loss = -(logp * attn).sum() / attn.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_prefix_length_leaves_each_sequence_a_token_and_skips_short_ones():
    seqs = opening_alike(4096)
    assert shared_prefix_length(seqs) == PREFIX
    assert shared_prefix_length(seqs[:1]) == 0  # one sequence: nothing to share
    same = [seqs[0], seqs[0].clone()]
    assert shared_prefix_length(same) == len(seqs[0]) - 1  # identical: all but the last token
    short = [s[PREFIX - MIN_SHARED_TOKENS + 1:] for s in seqs]
    assert shared_prefix_length(short) == 0  # below MIN_SHARED_TOKENS a second pass does not pay
    routed = [torch.zeros(len(s), 2, 2, dtype=torch.int16) for s in seqs]
    routed[2][PREFIX - 5, 1, 0] = 3  # vLLM routed one prefix token of one sequence elsewhere
    assert shared_prefix_length(seqs, routed) == PREFIX - 5


def test_same_logprobs_gradients_and_max_logits_as_the_plain_pass(model):
    ids, attn = padded(opening_alike(model.config.vocab_size))
    reset_max_logits(model)
    plain = padded_logprobs(model, ids, attn)
    plain_max = head_max_logits(model)
    reset_max_logits(model)
    shared = padded_logprobs(model, ids, attn, PREFIX)
    torch.testing.assert_close(head_max_logits(model), plain_max, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared * attn, plain * attn, atol=5e-5, rtol=0)

    plain_loss, plain_grads = loss_and_grads(model, plain, attn)
    shared_loss, shared_grads = loss_and_grads(model, shared, attn)
    torch.testing.assert_close(shared_loss, plain_loss)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_replayed_routing_reaches_both_passes(model):
    ids, attn = padded(opening_alike(model.config.vocab_size))
    other = (own_routing(model, ids) + 1) % model.config.n_routed_experts  # every token elsewhere
    with torch.no_grad():
        with replay_routing(model, other):
            plain = padded_logprobs(model, ids, attn)
        with replay_routing(model, other) as replay:
            shared = padded_logprobs(model, ids, attn, PREFIX, replay)
        unreplayed = padded_logprobs(model, ids, attn)
    torch.testing.assert_close(shared * attn, plain * attn, atol=5e-5, rtol=0)
    assert not torch.allclose(unreplayed * attn, plain * attn, atol=1e-3)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_train_engine_step_is_the_same_with_and_without_sharing(tiny_model_dir, world_of_one, zero_stage):
    seqs = opening_alike(4096)
    batch = TokenBatch([s for s in seqs], [torch.arange(len(s)) >= PREFIX for s in seqs])
    batch.token_data[ROUTED_EXPERTS] = [torch.full((len(s), 2, 2), -1, dtype=torch.int16) for s in seqs]

    def stepped(shared: bool):
        job = JobConfig(optimizer={"name": "adamw", "lr": 1e-2},
                        train={"zero_stage": zero_stage, "shared_prefix": shared, "micro_batch_tokens": 4096})
        engine = TrainEngine(tiny_model_dir, job)
        assert engine._shared_prefix(batch) == (PREFIX if shared else 0)
        before = engine.logprobs(batch)
        stats = engine.train_step(batch, nll)
        return before, stats, engine.logprobs(batch)

    plain, shared = stepped(False), stepped(True)
    if zero_stage == 2:  # ZeRO-3 reduces per module call: a module run twice would count its gradient twice
        job = JobConfig(optimizer={"name": "adamw"}, train={"zero_stage": 3, "shared_prefix": True})
        assert TrainEngine(tiny_model_dir, job)._shared_prefix(batch) == 0
    for a, b in zip(plain[0] + plain[2], shared[0] + shared[2]):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=0)
    assert shared[1]["loss"] == pytest.approx(plain[1]["loss"], abs=1e-5)
    assert shared[1]["attn/max_logit"] == pytest.approx(plain[1]["attn/max_logit"], abs=1e-4)


@pytest.mark.parametrize("shared", [0, PREFIX])
def test_only_wanted_tokens_are_scored(model, shared):
    """With `wanted` (the loss mask) the vocabulary projection sees only the positions that score a
    wanted token: their logprobs and gradients equal the full pass's, the others are 0.0."""
    ids, attn = padded(opening_alike(model.config.vocab_size))
    wanted = attn.bool() & (torch.arange(ids.shape[1]) % 3 == 0)  # every third token, as a loss mask picks
    wanted[0, PREFIX - 5] = True  # a prefix token one row wants, and two rows' first own token
    wanted[:2, PREFIX] = True
    full = padded_logprobs(model, ids, attn, shared)
    projected = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _, args, out: projected.append(len(args[0].flatten(0, -2))))
    try:
        part = padded_logprobs(model, ids, attn, shared, wanted=wanted)
    finally:
        hook.remove()
    if shared:  # the prefix runs once: a position is scored once whatever the rows that want its token
        assert projected == [wanted[:, 1:PREFIX + 1].any(0).sum(), wanted[:, PREFIX + 1:].sum()]
    else:
        assert projected == [wanted[:, 1:].sum()]
    torch.testing.assert_close(part, full * wanted, atol=2e-6, rtol=0)
    _, full_grads = loss_and_grads(model, full * wanted, attn)
    _, part_grads = loss_and_grads(model, part, attn)
    torch.testing.assert_close(part_grads, full_grads, atol=1e-6, rtol=1e-4)


def test_micro_batches_count_the_shared_prefix_once():
    seqs = opening_alike(4096)  # 49, 43, 57 tokens, 40 shared
    batch = TokenBatch.from_lists([s.tolist() for s in seqs])
    assert len(batch.micro_batches(3 * 57)) == 1 and len(batch.micro_batches(3 * 57 - 1)) == 2
    assert len(batch.micro_batches(PREFIX + 3 * 17, shared=PREFIX)) == 1
    assert len(batch.micro_batches(PREFIX + 3 * 17 - 1, shared=PREFIX)) == 2


@pytest.mark.gpu
def test_on_the_gpu_under_bf16_autocast_the_gap_is_rounding(tiny_model_dir):
    """fp32 master weights, bf16 autocast (the GPU trainer's setup): batch-of-one and batched kernels
    round apart, so the shared pass agrees to bf16 noise, not bit for bit."""
    model = load_model(tiny_model_dir).cuda().train()
    ids, attn = padded(opening_alike(model.config.vocab_size))
    ids, attn = ids.cuda(), attn.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = padded_logprobs(model, ids, attn)
        shared = padded_logprobs(model, ids, attn, PREFIX)
    gap = ((shared - plain).abs() * attn).sum() / attn.sum()
    assert gap < 1e-2, gap
    _, plain_grads = loss_and_grads(model, plain, attn)
    _, shared_grads = loss_and_grads(model, shared, attn)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(shared_grads), flat(plain_grads), dim=0) > 0.99
