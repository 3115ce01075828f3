#!/usr/bin/env bash
# The figures of docs/figures from the runs committed under docs/runs (see scripts/fd_evidence.sh for the runs).
#   bash scripts/fd_evidence_figures.sh
cd "$(dirname "$0")/.."
set -e
R=docs/runs/constant-feedback; S=docs/runs/sparse-rewards
python -m trainer.plot $R/const-one-sentence-s0 $R/const-one-sentence-s1 $R/const-concise-s0 $R/const-concise-s1 \
  $R/const-careful-s0 $R/const-careful-s1 $R/const-bullets-s0 \
  --labels "Answer in one short sentence." "Answer in one short sentence." "Be concise." "Be concise." \
  "Think carefully... Verify..." "Think carefully... Verify..." "Answer with a bulleted list." \
  --metric train/response_tokens --metric fd/kl_topk --metric train/entropy \
  --title "Constant-feedback FD, frozen teacher, SmolLM2-135M-Instruct (seeds: mean, min..max)" \
  --out docs/figures/constant_feedback.png --csv docs/figures/constant_feedback.csv
python scripts/length_hist.py "initial model, no feedback=$R/initial-nofeedback/lengths.jsonl" \
  "initial model, feedback in its prompt=$R/initial-one-sentence/lengths.jsonl" \
  "FD student, no feedback, after 5-6 steps=$R/const-one-sentence-s0/lengths.jsonl,$R/const-one-sentence-s1/lengths.jsonl@5" \
  --title '"Answer in one short sentence.": response lengths' --out docs/figures/constant_feedback_lengths.png
python -m trainer.plot $S/fd-ground_truth $S/fd-compiler $S/grpo --labels "FD, ground_truth" "FD, compiler" GRPO \
  --metric train/accuracy --metric train/entropy --metric fd/kl_topk --metric train/response_tokens \
  --title "FD vs GRPO where rewards are sparse: SmolLM2-135M-Instruct, 27 Rocq problems" \
  --out docs/figures/sparse_rewards.png --csv docs/figures/sparse_rewards.csv
