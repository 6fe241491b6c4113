#!/usr/bin/env bash
# minke speedrun: the DeepSeek-V3/R1 recipe end to end at toy scale, on a 2-core CPU.
#
#   bash runs/speedrun.sh            (what `make run` does; outputs under out/speedrun/)
#
# Each stage is one `minke <stage>` command reading the previous stage's output directory. Run it
# again after an interruption and each stage continues from its newest checkpoint (a finished stage
# only redoes its report); delete out/speedrun/ to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/speedrun}
start=$SECONDS

# OpenMP's default spin-waiting makes torch's 2 threads ~10× slower as soon as anything else runs on
# the 2 cores (measured: 30 test-size steps 28.6 s → 3.3 s with PASSIVE); threads that sleep cost
# little when the cores are free.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# A stage resumes when its directory already holds a checkpoint.
resume() { if compgen -G "$1/step-*" > /dev/null; then echo --resume "$1"; fi; }

# ---- 1. tokenizer + pretraining -------------------------------------------------------------------
# Data: 40,000 documents "Question: …\nAnswer: <worked steps> \boxed{…}" from the arithmetic and
#   countdown tasks (difficulty 1–3, train split) ≈ 60 tokens each → 2.4M tokens; held-out loss on
#   400 documents of the tasks' test split. A byte-level BPE (single digits) is trained on the same
#   documents first: --vocab-size 512 asked, ~340 learned (the corpus has few distinct words); the
#   model's vocab is that rounded up to a multiple of 64.
# Model: the tiny preset (MLA, 1 dense + 2 MoE layers of 8 routed experts, top-2 of 2 groups, 1 shared
#   expert, 1 MTP module): 0.23M parameters, 0.16M active per token, +0.08M in the MTP module.
# Steps: 32 sequences × 128 tokens = 4,096 tokens/step; 1,500 steps = 6.1M tokens ≈ 2.6 epochs.
#   LR 3e-3: 50 warmup steps, constant to step 750, cosine to 3e-4 (V3 §4.2's shape).
# Time: fp32 (bf16 autocast is slower on CPU), ~16k tokens/s on one free core → 0.25 s/step → ~6.4 min
#   of steps, plus ~25 s for corpus, tokenizer, 11 held-out evaluations, 3 checkpoints, the greedy
#   accuracy check on 50 held-out problems and the plots. Measured: with one thread the whole script
#   used 6m49s of CPU (= its wall time on an idle machine); with 2 threads on 2 cores shared with
#   other jobs (load average ~5) it took 14m01s wall. Expect 5–7 min on an idle 2-core machine.
$PY -m minke.cli pretrain --out "$OUT/pretrain" $(resume "$OUT/pretrain") \
    --docs 40000 --eval-docs 400 --vocab-size 512 --preset tiny --seq-len 128 \
    --steps 1500 --batch-size 32 --lr 3e-3 --warmup 50 --decay-from 0.5 \
    --eval-every 150 --save-every 500 --log-every 50

echo
echo "speedrun done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
echo "  pretrained model: $OUT/pretrain/final   (minke chat --model $OUT/pretrain/final)"
echo "  report:           $OUT/pretrain/report.md"
