#!/bin/bash
# The GPU checks of issue 12 on the device machine, from an unpacked site (PLATFORM.md, "vLLM on the
# GPU machine"): the gpu-marked tests, then the one-step benchmark, then the logprob-gap diagnosis;
# or the GPU demo (not part of "all"), each output line time-stamped, its runs' metrics, held-out
# dialogs and logs packed in LOG_DIR/demo-files.tar.gz (the device returns at most 8 files a call).
#   bash scripts/gpu_check.sh [tests|engine-tests|routing-tests|bench|gap|all|rollout|settings|demo] [LOG_DIR] [bench_gpu_step.py, bench_rollout_settings.py or demo.py options]
#   (demo: DEMO_LIMIT=SECONDS stops it in time, COLD=1 compiles into fresh caches, kept for --resume; below)
#   (SAVE_CACHE=1: the compile caches packed into LOG_DIR, for .gpu/ of a later call; below)
# (default: all, logs in $OUT or ./gpu-logs). Each part fits one 10-minute device call, but for "tests"
# on a fresh machine (2026-12-07: over 9.5 min with the unpack, Triton compiling in each first vLLM
# start): there, "engine-tests" then "routing-tests" are its two halves. The k2-mini model is built
# once per machine (/tmp/k2-mini); GAP_MODEL=DIR gives the gap part another model.
set -uo pipefail
PART=${1:-all}
case $PART in
  tests|engine-tests|routing-tests|bench|gap|all|rollout|settings|demo) ;;
  *) echo "gpu_check.sh: unknown part '$PART'; give one of tests, engine-tests, routing-tests, bench, gap, all, rollout, settings, demo" >&2
     exit 2 ;;
esac
LOGS=${2:-${OUT:-gpu-logs}}
mkdir -p "$LOGS"
[ -f /tmp/site/env.sh ] && . /tmp/site/env.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
MODEL=/tmp/k2-mini
# Every part compiles into one set of caches (vLLM's, Inductor's, Triton's, ...; bench_vllm_start.py's
# list), seeded from .gpu/compile-cache.tar.gz.part* where a checkout carries them: a fresh machine's
# first vLLM start of each engine configuration then loads its kernels instead of compiling them (110 s
# cold, 52 s warm on an H100, 2026-12-06). SAVE_CACHE=1 packs the caches into LOG_DIR at the end, in
# parts of 15 MiB (the device returns files of at most 16 MiB; k2-mini's were 17 MiB, 2026-12-07).
CACHES=/tmp/k2rl-compile-caches
if [[ ! -d $CACHES ]]; then
  mkdir -p $CACHES
  if compgen -G ".gpu/compile-cache.tar.gz.part*" > /dev/null; then
    cat .gpu/compile-cache.tar.gz.part* | tar -C $CACHES -xzf -
  fi
fi
eval "$(python3 scripts/bench_vllm_start.py --cache-env $CACHES)"
build_model() {
  [ -f $MODEL/config.json ] || python3 -c "from k2rl.model.build import make_model; make_model('k2-mini', '$MODEL', seed=0)"
}
status=0
ENGINE_TESTS=("tests/test_rollout_engine_gpu.py -k eager" "tests/test_rollout_engine_gpu.py -k graphs"
              tests/test_worker_gpu.py tests/test_train_engine_gpu.py
              "tests/test_shared_prefix.py tests/test_attention.py tests/test_experts.py tests/test_optim.py tests/test_head.py tests/test_seeded_sampling.py -m gpu")
ROUTING_TESTS=("tests/test_routing_at_finish.py -m gpu")  # (two vLLM starts of its own, in subprocesses)
case $PART in
  tests|all) TESTS=("${ENGINE_TESTS[@]}" "${ROUTING_TESTS[@]}") ;;
  engine-tests) TESTS=("${ENGINE_TESTS[@]}") ;;
  routing-tests) TESTS=("${ROUTING_TESTS[@]}") ;;
  *) TESTS=() ;;
esac
if (( ${#TESTS[@]} )); then
  # First, not beside the tests: it builds on the GPU, and the engine tests read the GPU's memory
  build_model > "$LOGS/make_model.log" 2>&1 || status=1
  # One process per engine configuration (vLLM engines of one process share its distributed state);
  # -s: vLLM redirects the real stdout while it builds process groups, which pytest's capture hides.
  for t in "${TESTS[@]}"; do
    echo "== pytest $t" | tee -a "$LOGS/tests.log"
    seen=$(wc -l < "$LOGS/tests.log")
    timeout 300 python3 -m pytest -x -q -s -p no:cacheprovider $t >> "$LOGS/tests.log" 2>&1 || status=1
    tail -n +$((seen + 1)) "$LOGS/tests.log" | grep -E "GPU memory used|logprob gap|preempted|passed|failed|^E |Error" | tail -8
  done
fi
if [[ $PART == bench || $PART == all ]]; then
  build_model
  python3 scripts/bench_gpu_step.py --model-dir $MODEL --json "$LOGS/bench.json" "${@:3}" > "$LOGS/bench.log" 2>&1 || status=1
  grep -v "WARNING\|INFO\|Warning\|warn" "$LOGS/bench.log" | tail -45
fi
if [[ $PART == rollout ]]; then  # the rollout goal's row, ROUNDS runs (default 3), each its own process (not part of "all")
  # One run's median was 0.79-1.007 across nine runs on H100s (2026-12-07); several runs say how reliably
  build_model
  runs=()  # this call's runs only: a glob would also sum an earlier call's in the same LOG_DIR
  for round in $(seq "${ROUNDS:-3}"); do
    runs+=("$LOGS/rollout-$round.json")
    rm -f "${runs[-1]}"
    python3 scripts/bench_gpu_step.py --model-dir $MODEL --rollout-only --json "${runs[-1]}" "${@:3}" \
      > "$LOGS/rollout-$round.log" 2>&1 || status=1
    grep -E "^rollout/|^baseline/" "$LOGS/rollout-$round.log"
  done
  python3 scripts/rollout_runs.py "${runs[@]}" || status=1
fi
if [[ $PART == settings ]]; then  # what each of the RolloutEngine's vLLM settings costs (not part of "all")
  build_model
  python3 scripts/bench_rollout_settings.py --model-dir $MODEL --json "$LOGS/settings.json" "${@:3}" > "$LOGS/settings.log" 2>&1 || status=1
  grep -v "WARNING\|INFO\|Warning\|warn" "$LOGS/settings.log" | tail -30
fi
if [[ $PART == gap || $PART == all ]]; then
  # GAP_MODEL=DIR: a trained model instead of the random k2-mini (the GPU demo's SFT stage writes one
  # to /tmp/gpu-demo/demo-sft-s0/checkpoints/step_300/model)
  [[ -n ${GAP_MODEL:-} ]] || build_model
  python3 scripts/gpu_gap.py "${GAP_MODEL:-$MODEL}" > "$LOGS/gap.log" 2>&1 || status=1
  grep -E "^\[|^layer|Error|error" "$LOGS/gap.log" | tail -40
  python3 scripts/gpu_gap.py "${GAP_MODEL:-$MODEL}" --bf16-logits > "$LOGS/gap_bf16_logits.log" 2>&1 || status=1
  grep -E "^\[|Error|error" "$LOGS/gap_bf16_logits.log" | tail -6
fi
if [[ $PART == demo ]]; then
  # COLD=1: vLLM, Inductor and Triton compile into fresh caches, as on a fresh machine (the tests and
  # the bench leave theirs warm); the kernels compiled are listed in compiled_kernels.txt (in the archive).
  # With --resume (COLD=1 again) the demo goes on with the caches its first call filled (the prewarm's).
  if [[ ${COLD:-0} == 1 ]]; then  # (vLLM moves Triton's and Inductor's caches under its own when it compiles)
    cold=/tmp/gpu-demo-cold-caches
    [[ " ${*:3} " == *" --resume "* ]] || rm -rf "$cold"
    mkdir -p "$cold"
    eval "$(python3 scripts/bench_vllm_start.py --cache-env "$cold")"  # the caches bench_vllm_start.py redirects
  fi
  # DEMO_LIMIT=SECONDS stops the demo (SIGTERM: it checkpoints; --resume continues) in time to keep its logs:
  # at most the device call's limit minus ~45 s (30 s for the SIGTERM checkpoint, then the copies below)
  started=$(mktemp)  # its time stamp tells the Ray sessions of this demo (below)
  # Time-stamped through a process substitution, not a pipe: a pipe's reader waits for every process
  # holding its other end, and a stopped demo's leftovers held it past the device call's limit (09:53).
  timeout -k 30 "${DEMO_LIMIT:-0}" python3 scripts/demo.py --gpu --out /tmp/gpu-demo "${@:3}" \
    > >(while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done > "$LOGS/demo.log") 2>&1 || status=1
  # A stopped demo's Ray processes (and its prewarm's vLLM) would keep their GPU memory from a --resume
  pkill -9 -f "[r]ay::|[r]aylet|[g]cs_server|[k]2rl.cli prewarm" 2>/dev/null
  sleep 2  # the time stamps' last lines
  files=$(mktemp -d)  # packed into one archive below
  for run in /tmp/gpu-demo/demo-*; do
    [ -d "$run" ] || continue
    mkdir -p "$files/$(basename "$run")"
    cp "$run"/metrics.jsonl "$run"/rollouts/eval_step_*.jsonl "$files/$(basename "$run")/" 2>/dev/null
  done
  cp /tmp/gpu-demo/demo-s*.json /tmp/gpu-demo/prewarm-s*.log "$files/" 2>/dev/null
  # Each stage's Ray workers (vLLM and the trainer live there; their output is not sent to the
  # driver): the tail of each worker's stdout and stderr, one file per Ray session the demo started
  for session in $(find /tmp/ray -maxdepth 1 -name "session_2*" -newer "$started" 2>/dev/null); do
    for log in "$session"/logs/worker-*.out "$session"/logs/worker-*.err; do
      [ -s "$log" ] || continue
      echo "== $(basename "$log")"
      grep -v "Warning\|warn(" "$log" | tail -n 150
    done > "$files/workers-$(basename "$session").log"
  done
  rm -f "$started"
  if [[ ${COLD:-0} == 1 ]]; then  # one cubin per Triton compile, one .so per FlashInfer (nvcc) module
    { find "$cold" -name "*.cubin" -printf "%f\n"; find "$cold/flashinfer" -name "*.so" -printf "nvcc: %f\n"; } 2>/dev/null \
      | sed -E 's/\.(cubin|so)$//' | sort | uniq -c | sort -rn > "$files/compiled_kernels.txt"
  fi
  tar -czf "$LOGS/demo-files.tar.gz" -C "$files" . && rm -rf "$files"
  grep -v "WARNING\|INFO\|Warning\|warn" "$LOGS/demo.log" | tail -40
fi
if [[ ${SAVE_CACHE:-0} == 1 ]]; then
  rm -f "$LOGS"/compile-cache.tar.gz.part*
  tar -C $CACHES -czf - . | split -b 15m - "$LOGS/compile-cache.tar.gz.part"
  echo "compile caches: $(cat "$LOGS"/compile-cache.tar.gz.part* | wc -c | awk '{printf "%.1f", $1 / 1048576}') MiB" \
       "packed in $(ls "$LOGS"/compile-cache.tar.gz.part* | wc -l) part(s), $LOGS/compile-cache.tar.gz.part*"
fi
exit $status
