#!/usr/bin/env bash
# The runs behind docs/figures: SmolLM2-135M-Instruct on our Rocq problem set, all runs of a part at once
# (they fit one GPU together).
#
#   bash scripts/fd_evidence.sh OUT_DIR constant   # constant-feedback internalisation (paper 5.3, Figure 7)
#   bash scripts/fd_evidence.sh OUT_DIR sparse     # FD (ground_truth, compiler) vs GRPO, same budget (Figures 2, 3)
#   bash scripts/fd_evidence.sh OUT_DIR passk      # pass@k, k <= 32, on the held-out problems after `sparse`
#
# Environment: MODEL (smollm2), STEPS (40), RUN_LIMIT_S (0: none; else each training run is stopped
# after that many seconds and keeps the steps it finished: metrics.jsonl is written step by step),
# MAX_NEW_TOKENS (384), N_PASSK (32); for `constant`: LABELS (the feedbacks to train with, default all
# four), SEEDS ("0 1"), BASELINES (1: also sample the initial model with each feedback in its prompt);
# GPUS ("0": the runs are spread over these devices in turn). Problems: the first 27 of data/rocq_problems.jsonl train, the
# last 10 are held out.
set -euo pipefail
out=${1:?OUT_DIR}; part=${2:?constant, sparse or passk}
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2}; STEPS=${STEPS:-40}; RUN_LIMIT_S=${RUN_LIMIT_S:-0}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-384}; N_PASSK=${N_PASSK:-32}
SEEDS=${SEEDS:-0 1}; BASELINES=${BASELINES:-1}; read -ra gpus <<< "${GPUS:-0}"; runs=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$out"; rm -f "$out/status.txt"
head -n 27 data/rocq_problems.jsonl > "$out/train.jsonl"
tail -n +28 data/rocq_problems.jsonl > "$out/heldout.jsonl"

common=(model="$MODEL" prover=rocq problems="$out/train.jsonl" steps="$STEPS" max_new_tokens="$MAX_NEW_TOKENS"
        lr=5e-5 warmup_steps=2 gradient_checkpointing=false)

train() {  # train RUN_NAME key=value... (in the background, on the next of GPUS)
  local gpu=${gpus[runs % ${#gpus[@]}]}; runs=$((runs + 1))
  _train "$gpu" "$@" &
}

_train() {
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout --signal=TERM "$RUN_LIMIT_S" \
    python -m trainer.run "${common[@]}" out_dir="$out/$name" "$@" > "$out/$name.log" 2>&1 \
    || echo "$name: exit $? (124: stopped at RUN_LIMIT_S=$RUN_LIMIT_S)" >> "$out/status.txt"
}

evaluate() {  # evaluate NAME MODEL PROBLEMS N K [evaluate args...]
  local name=$1 model=$2 problems=$3 n=$4 k=$5; shift 5
  python -m trainer.evaluate --model "$model" --problems "$problems" --prover rocq --device auto --n "$n" \
    --k "$k" --max-new-tokens "$MAX_NEW_TOKENS" --out "$out/$name.jsonl" "$@" > "$out/$name.json" 2> "$out/$name.log" \
    || echo "$name: exit $?" >> "$out/status.txt"
}

case $part in
  constant)
    declare -A texts=(
      [concise]="Be concise."
      [careful]="Think carefully before answering. Verify that the solution is correct."
      [one-sentence]="Answer in one short sentence."
      [bullets]="Answer with a bulleted list."
    )
    (( BASELINES )) && evaluate base-nofeedback "$MODEL" "$out/train.jsonl" 2 1 &
    for label in ${LABELS:-${!texts[@]}}; do
      (( BASELINES )) && evaluate "base-$label" "$MODEL" "$out/train.jsonl" 2 1 --prompt-feedback "${texts[$label]}" &
      for seed in $SEEDS; do
        train "const-$label-s$seed" algorithm=fd feedback=constant feedback_text="${texts[$label]}" ema_alpha=1 \
          prompts_per_step=16 samples_per_prompt=2 seed="$seed" checkpoint_every=0
      done
    done
    wait ;;
  sparse)
    ckpt=(checkpoint_every=5 keep_checkpoints=1)
    train fd-ground_truth algorithm=fd feedback=ground_truth prompts_per_step=16 samples_per_prompt=2 "${ckpt[@]}"
    train fd-compiler algorithm=fd feedback=compiler prompts_per_step=16 samples_per_prompt=2 "${ckpt[@]}"
    train grpo algorithm=grpo prompts_per_step=8 samples_per_prompt=4 "${ckpt[@]}"
    wait ;;
  passk)
    ks=1; (( N_PASSK > 8 )) && ks+=,8; (( N_PASSK > 1 )) && ks+=",$N_PASSK"
    evaluate passk-base "$MODEL" "$out/heldout.jsonl" "$N_PASSK" "$ks" &
    for run in fd-ground_truth fd-compiler grpo; do
      latest="$out/$run/checkpoints/$(cat "$out/$run/checkpoints/latest")/model"
      evaluate "passk-$run" "$latest" "$out/heldout.jsonl" "$N_PASSK" "$ks" &
    done
    wait ;;
  *) echo "unknown part $part: constant, sparse or passk" >&2; exit 2 ;;
esac
cat "$out/status.txt" 2>/dev/null || true
