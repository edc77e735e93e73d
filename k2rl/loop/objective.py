"""The loss the workers minimise, built from `algorithm` config; a picklable callable so Ray can ship it.

It follows the TrainEngine's loss contract (k2rl.engines.train): per-sequence logprobs aligned with
the ids in, (loss, stats) out. Without `old_logprobs` in the batch (one update per rollout), the
update's own forward stands for the sampling policy: the same numbers, one forward pass fewer.
Sequences flagged `ptx` in the batch are K2's PTX data: they add `ptx_coef` x next-token loss; the
rest take the RL objective (or plain SFT with `algorithm: sft`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from k2rl.algo import k2_loss, pg_clip_loss, sft_loss, truncated_is_weights
from k2rl.config import AlgorithmConfig


def _pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    return pad_sequence(seqs, batch_first=True)


@dataclass
class Objective:
    algo: AlgorithmConfig

    def __call__(self, new_logprobs: list[torch.Tensor], batch) -> tuple[torch.Tensor, dict[str, float]]:
        logp = _pad(new_logprobs)
        mask = _pad(batch.loss_mask).to(logp.dtype).to(logp.device)
        ptx = batch.seq_data.get("ptx", torch.zeros(len(new_logprobs))).bool().to(logp.device)
        stats: dict[str, float] = {}
        parts = []
        if self.algo.name == "sft":
            return sft_loss(logp, mask), stats
        rl = ~ptx
        if rl.any():
            rl_loss, stats = self._rl_loss(logp[rl], mask[rl], batch, rl)
            parts.append(rl_loss * mask[rl].sum())
        if ptx.any():
            ptx_loss = sft_loss(logp[ptx], mask[ptx])
            stats["loss/ptx"] = float(ptx_loss.detach())
            parts.append(self.algo.ptx_coef * ptx_loss * mask[ptx].sum())
        # Token-weighted like the engine expects: the micro-batch's mean over its loss tokens.
        return sum(parts) / mask.sum().clamp(min=1), stats

    def _rl_loss(self, logp, mask, batch, rows):
        dev = logp.device
        adv = batch.seq_data["advantages"].to(dev)[rows]
        stats: dict[str, float] = {}
        rollout = (_pad(batch.token_data["rollout_logprobs"]).to(dev)[rows]
                   if "rollout_logprobs" in batch.token_data else None)
        if "old_logprobs" in batch.token_data:
            old = _pad(batch.token_data["old_logprobs"]).to(dev)[rows]
        else:  # one update per rollout: this forward is the sampling policy's, no separate pass needed
            old = logp.detach()
            if rollout is not None:
                stats["mismatch/logprob_abs"] = float(((old - rollout).abs() * mask).sum() / mask.sum().clamp(min=1))
        weights = None
        if self.algo.truncated_is_cap is not None:
            weights = truncated_is_weights(old, rollout, mask, self.algo.truncated_is_cap)
        if self.algo.name == "k2":
            loss, loss_stats = k2_loss(logp, old, mask, adv, self.algo.tau, weights)
        else:
            ref = _pad(batch.token_data["ref_logprobs"]).to(dev)[rows] if self.algo.kl_coef > 0 else None
            loss, loss_stats = pg_clip_loss(logp, old, mask, adv, self.algo.clip_eps, self.algo.aggregation,
                                            weights, self.algo.kl_coef, ref)
        return loss, {**stats, **loss_stats}
