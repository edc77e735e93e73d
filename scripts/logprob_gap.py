"""Print the vLLM-vs-trainer logprob gap for a model in fp32 and bf16.

    python scripts/logprob_gap.py [MODEL_DIR]     (default: builds k2-tiny in a temp dir)
"""
import sys
import tempfile

from k2rl.model.agreement import measure
from k2rl.model.build import make_model


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else make_model("k2-tiny", tempfile.mkdtemp(), seed=0)
    for dtype in ("float32", "bfloat16"):
        r = measure(model_dir, dtype, prompts=16, tokens=32)
        print(f"logprob gap {dtype}: mean {r.mean_abs_gap:.2e}  max {r.max_abs_gap:.2e}  over {r.tokens} tokens")


if __name__ == "__main__":
    main()
