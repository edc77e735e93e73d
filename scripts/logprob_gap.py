"""Print the vLLM-vs-trainer logprob gap for a model in fp32, and in bf16 with both engines' logits in
fp32 (the default, `model.fp32_head`) and rounded to bf16.

    python scripts/logprob_gap.py [MODEL_DIR]     (default: builds k2-tiny in a temp dir)
"""
import sys
import tempfile

from k2rl.model.agreement import measure
from k2rl.model.build import make_model


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else make_model("k2-tiny", tempfile.mkdtemp(), seed=0)
    for dtype, fp32_head in (("float32", True), ("bfloat16", True), ("bfloat16", False)):
        r = measure(model_dir, dtype, prompts=16, tokens=32, fp32_head=fp32_head)
        head = "" if dtype == "float32" else f", {'fp32' if fp32_head else 'bf16'} logits"
        print(f"logprob gap {dtype}{head}: mean {r.mean_abs_gap:.2e}  max {r.max_abs_gap:.2e}  over {r.tokens} tokens")


if __name__ == "__main__":
    main()
