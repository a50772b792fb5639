#!/usr/bin/env bash
# Dark Key-to-Door 9x9 at the papers' task count, on one GPU box, in one timed go.
#
# A device lease in this project is about ten minutes, so every stage has a deadline and the
# script keeps whatever finished. It
#   1. collects 1,250 tasks (1,000 train / 125 validation / 125 test) x 16 PPO streams x 160
#      episodes with the batched PPO on the GPU (one chunk: the per-update cost on CUDA is
#      launch-bound, so more tasks per chunk are nearly free);
#   2. trains AD with the model of every 2-core 9x9 run (config/model/ad_k2d9.yaml) on seeds
#      0-2, sharing the GPU (what changes against the 2-core 16-stream runs is the task count);
#   3. evaluates each finished run on the test tasks at temperature 0.75 (eval_summary.json),
#      on the validation tasks at 0.75 and on the test tasks at 1.0;
#   4. packs logs, summaries and per-episode returns (not checkpoints or data) into one file,
#      OUT/results.tar.gz (the device tool brings back at most 8 files from OUT).
#
#   bash scripts/gpu_k2d9_papers.sh OUT [BUDGET_SECONDS]    # default budget 540 s
#   MAX_TASKS=40 STEPS=6400 TRAIN_STEPS=30 EVAL_SET=eval_episodes=3 DEVICE=cpu bash scripts/gpu_k2d9_papers.sh /tmp/o 300   # smoke run
#
# The results are in docs/ablations/dark_key_to_door_9x9_1000_tasks.md.
set -u
OUT=${1:?usage: gpu_k2d9_papers.sh OUT [BUDGET_SECONDS]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MAX_TASKS=${MAX_TASKS:-1250}
STEPS=${STEPS:-128000}           # per task: 16 streams x 8,000 steps = 160 episodes per stream
TRAIN_STEPS=${TRAIN_STEPS:-5000}
EVAL_RESERVE=${EVAL_RESERVE:-110} # seconds kept for evaluation after the trainings' deadline
EVAL_SET=${EVAL_SET:-}            # extra evaluate.py settings (the smoke run: eval_episodes=3)
START=$(date +%s)
mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stamp() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/timeline.txt"; }

DATA="config/algorithm/ppo_dark_key_to_door.yaml config/env/dark_key_to_door_9x9_650.yaml"
SCALE="max_tasks=$MAX_TASKS n_stream=16 total_source_timesteps=$STEPS dataset_dir=datasets/k2d9_papers device=$DEVICE"
RUNS=runs/k2d9_papers
export PYTHONUNBUFFERED=1

stamp "start: budget $BUDGET s, device $DEVICE, $MAX_TASKS tasks"
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
(nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 || true) > "$OUT/gpu_usage.csv" 2>&1 &
SAMPLER=$!
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/timeline.txt"

stamp "collect"
timeout $(( $(left) - 200 )) $PY collect.py $DATA --set $SCALE task_chunk=$MAX_TASKS > "$OUT/collect.log" 2>&1
rc=$?
stamp "collect done rc=$rc"
if [ $rc -ne 0 ]; then kill $SAMPLER; exit 1; fi
FILE=$(ls datasets/k2d9_papers/*.hdf5)
ls -l "$FILE" >> "$OUT/timeline.txt"
$PY scripts/source_curve.py "$FILE" --split test > "$OUT/source_curve_test.txt" 2>&1 &

TRAIN_END=$(( START + BUDGET - EVAL_RESERVE ))  # the trainings' deadline (epoch seconds)
chain() {  # train one run, then evaluate it while time is left: test 0.75, val 0.75, test 1.0
    local name=$1 run_dir=$2 seed=$3; shift 3
    timeout $(( TRAIN_END - $(date +%s) )) $PY train.py $DATA config/model/ad_k2d9.yaml \
        --set $SCALE data_cache_mb=8192 run_dir=$run_dir seed=$seed "$@" > "$OUT/train_$name.log" 2>&1
    local rc=$?
    stamp "train $name rc=$rc"
    # out of time (124): evaluate the last checkpoint anyway; its log says how many steps it had
    [ $rc -eq 0 ] || [ $rc -eq 124 ] || return
    local run=$run_dir/AD-dark_key_to_door-seed$seed
    for tag_set in "|" "val_T075|eval_split=val" "test_T10|eval_temperature=1.0"; do
        local tag=${tag_set%%|*} set=${tag_set#*|}
        timeout $(( $(left) - 15 )) $PY evaluate.py "$run" ${tag:+--tag $tag} --set device=$DEVICE $EVAL_SET $set \
            > "$OUT/eval_${name}_${tag:-test_T075}.log" 2>&1
        stamp "eval $name ${tag:-test_T075} rc=$?"
    done
}
stamp "train (deadline in $(( TRAIN_END - $(date +%s) )) s)"
for seed in 0 1 2; do
    chain seed$seed $RUNS $seed train_timesteps=$TRAIN_STEPS &
done
wait $(jobs -p | grep -v "^$SAMPLER$")
kill $SAMPLER 2>/dev/null
stamp "pack"
# the small files only: logs, summaries, configs, per-episode returns, TensorBoard events
mkdir -p $RUNS/device_logs && cp "$OUT"/*.log "$OUT"/*.txt "$OUT"/*.csv $RUNS/device_logs/
tar czf "$OUT/results.tar.gz" --exclude='*.pt' $RUNS
stamp "done"
