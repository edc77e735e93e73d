"""What each setting the RolloutEngine adds to plain vLLM costs the rollout in tokens/s (issue 12: the
Worker's rollout ran at 0.81 of plain vLLM, and at 1.02 of the RolloutEngine alone, so the engine's
settings cost it, not the colocation).

Plain vLLM (as bench_gpu_step.py starts it: the engine's dtype, lengths, memory and CUDA graphs) runs in
one process for the whole run; beside it, one process at a time, plain vLLM with one setting of
bench_gpu_step.ENGINE_SETTINGS added (sleep mode, routing replay, the structured-output backend), or its
requests (unseeded in plain vLLM, as a user's) with a seed each (`seeded`: what k2rl's per-request seeds
cost stock vLLM) or with flat logprobs (`flat_logprobs`, as the engine asks for them), or seeded with
vLLM's sampler patched as the engine patches it (`batched_seeds`: seeded requests' noise in one kernel),
or with routing replay as the engine patches vLLM 0.26's scheduler for it (`lean_routing_replay`: each
request's routing read once as it finishes), and then the RolloutEngine itself.
Their generates take turns on the same prompts, so the shared machine's noise moves both alike; each
setting's figure is the median ratio of `--pairs` pairs, with the lowest and highest beside it.

    python scripts/bench_rollout_settings.py [--model-dir DIR] [--setting NAME ...] [--profile] [--json OUT.json]

`--profile` then tells host time from kernel time: where the kernels match but the walls do not, the
setting costs time between the kernels, and its table of Python functions by own time says where.

A CPU runs it as a smoke test (k2-tiny; vLLM-CPU has neither sleep mode nor routing replay, nor the
sampler and scheduler the patches replace, so only the structured-output backend, seeded requests,
flat logprobs and the engine): python scripts/bench_rollout_settings.py --preset k2-tiny --prompts 8 --new-tokens 16
"""
from __future__ import annotations

import tempfile

from bench_gpu_step import (ENGINE_SETTINGS, PATCH_SETTINGS, SAMPLING_SETTINGS, StandaloneBaseline,
                            job_config, model_arguments, paired_rates, print_figures, rollout_arguments)
from generate_profile import ON_GPU, compare_profiles

GPU_ONLY_SETTINGS = ("sleep_mode", "routing_replay", "batched_seeds", "lean_routing_replay")


def main() -> None:
    ap = rollout_arguments(model_arguments(__doc__))
    ap.add_argument("--setting", action="append",
                    choices=(*ENGINE_SETTINGS, *SAMPLING_SETTINGS, *PATCH_SETTINGS, "engine"),
                    help="what to compare with plain vLLM (repeatable; default: every setting, then the engine)")
    ap.add_argument("--profile", action="store_true",
                    help="after each setting's pairs, one generate of each under torch's profiler (kernel time "
                         "and launches beside wall time, top kernels side by side) and one under cProfile (top "
                         "host functions side by side)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from k2rl.model.build import make_model

    job = job_config(args)
    settings = args.setting or [*ENGINE_SETTINGS, *SAMPLING_SETTINGS, *PATCH_SETTINGS, "engine"]
    if not ON_GPU:
        settings = [s for s in settings if s not in GPU_ONLY_SETTINGS]
    model_dir = args.model_dir or make_model(args.preset or job.model.preset, tempfile.mkdtemp(prefix="bench-rollout-"),
                                             seed=0)
    out: dict[str, float | str] = {"cuda_graphs": str(not job.rollout.enforce_eager)}
    plain = StandaloneBaseline(args, model_dir, "vllm")
    try:
        for setting in settings:
            other = (StandaloneBaseline(args, model_dir, "engine") if setting == "engine"
                     else StandaloneBaseline(args, model_dir, "vllm", setting=setting))
            try:
                out.update(paired_rates(plain.tokens_per_s, other.tokens_per_s, (
                    f"{setting}/plain_vllm_tokens_per_s", f"{setting}/tokens_per_s", f"{setting}/vs_plain_vllm"),
                    args.pairs))
                if args.profile:
                    out.update(compare_profiles(setting, "plain", plain.profile(), other.profile()))
            finally:
                for line in other.close():
                    print(f"[{setting} start] {line}", flush=True)
            print_figures({k: v for k, v in out.items() if k.startswith(setting)}, None)
    finally:
        for line in plain.close():
            print(f"[plain vLLM start] {line}", flush=True)
        print_figures(out, args.json)


if __name__ == "__main__":
    main()
