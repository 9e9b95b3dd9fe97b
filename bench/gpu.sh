#!/usr/bin/env bash
# The GPU benchmark in one call: pretraining images/s (batched augmentation + bf16 + channels_last against
# the PIL / fp32 path) and the meta stage (batched reset and carry against the plain per-episode reference,
# the 600-episode test). About 2.5 minutes on one H100/H200. Each step has its own time limit (115 s and
# 95 s, plus 5 s to die), so the whole script ends within ~3.9 minutes even when a step hangs; a step that
# fails or times out costs only its own figures.
#
#   bash bench/gpu.sh                          # on a machine with a CUDA GPU (python3 with torch)
#   DEVICE=cpu QUICK=1 bash bench/gpu.sh       # the same commands on a CPU with tiny sizes (a dry run)
#   COMPILE=1 bash bench/gpu.sh                # also a torch.compile-d step (pretraining limit 175 s)
#
# The JSON lines go to $OUT/gpu_bench.jsonl when $OUT is set (else a temporary folder), each step's stderr
# to <that folder>/<step>.log; a short table of the figures is printed last.
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
COMPILE=${COMPILE:-0}
LOGS=${OUT:-$(mktemp -d)}
RESULTS="$LOGS/gpu_bench.jsonl"
: >"$RESULTS"
failed=0
PRE_LIMIT=115

if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), cpus: $(nproc)"

# step NAME LIMIT_SECONDS COMMAND...: run it with a time limit, keep its JSON line, never abort the script
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local started=$SECONDS
    if timeout --kill-after=5 "$limit" "$@" 2>"$LOGS/$name.log" | tee -a "$RESULTS"; then
        echo "== $name done in $((SECONDS - started)) s"
    else
        echo "== $name FAILED or timed out after $((SECONDS - started)) s; end of $LOGS/$name.log:"
        tail -n 20 "$LOGS/$name.log" || true
        failed=1
    fi
}

if [ "$QUICK" = 1 ]; then
    PRE_ARGS=(--quick --threads 1)
    META_ARGS=(--quick --threads 1)
else
    workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
    # batch 128 (the recipe); the batched pipeline also at 512; a miniImageNet-sized epoch (38,400 images)
    PRE_ARGS=(--batch_size 128 --steps 10 --warmup_steps 3 --num_workers "$workers" --pipeline_images 8192
              --repeats 2 --pipeline_batch_sizes 128 512 --epoch_images 38400)
    if [ "$COMPILE" = 1 ]; then PRE_ARGS+=(--compile); PRE_LIMIT=175; fi
    # reset on the full 600-episode test, as one batch of episodes; carry and the reference run one episode after another (100 Adam
    # steps of Python-dispatched kernels, up to ~0.1 s an episode), so they are timed on 20 and 12 episodes
    META_ARGS=(--episodes 600 --episode_batch 600 --train_episodes 100 --val_episodes 100 --carry_episodes 20 --ref_episodes 12
               --warmup 4)
fi

step pretrain "$PRE_LIMIT" "$PYTHON" bench/pretrain.py --device "$DEVICE" "${PRE_ARGS[@]}"
step meta 95 "$PYTHON" bench/meta.py --device "$DEVICE" "${META_ARGS[@]}"

echo "== results ($RESULTS):"
cat "$RESULTS"
echo "== summary"
"$PYTHON" -c 'import sys, bench; bench.print_summary(sys.argv[1])' "$RESULTS" || failed=1
exit $failed
