"""MuonClip (Muon for matrices + AdamW for the rest, then per-head QK-Clip for MLA), see docs/optim.md.

Call order per training step: `optimizer.step()`, then `apply_qk_clip(model, tau)`.
"""
from k2rl.optim.build import build_optimizer, muonclip_param_groups
from k2rl.optim.muonclip import MuonClip
from k2rl.optim.qk_clip import apply_qk_clip
from k2rl.optim.state import move_optimizer_state

__all__ = ["MuonClip", "apply_qk_clip", "build_optimizer", "move_optimizer_state", "muonclip_param_groups"]
