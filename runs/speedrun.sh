#!/usr/bin/env bash
# minke speedrun: the DeepSeek-R1 recipe end to end at toy scale, on a 2-core CPU:
#   pretrain (MLA + MoE + MTP) → cold-start SFT (R1-form traces) → GRPO (accuracy + format rewards)
#   → every stage's checkpoint evaluated on the same held-out problems → report.md + PNGs + summary.json
#
#   bash runs/speedrun.sh            (what `make run` does; outputs under out/speedrun/)
#
# Each stage is one `minke <stage>` command reading the previous stage's output directory. Run it
# again after an interruption and each stage continues from its newest checkpoint (a finished stage is
# skipped; the evaluations and the report are redone); delete out/speedrun/ to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/speedrun}
start=$SECONDS

# OpenMP's default spin-waiting makes torch's 2 threads ~10× slower as soon as anything else runs on
# the 2 cores (measured: 30 test-size steps 28.6 s → 3.3 s with PASSIVE); threads that sleep cost
# little when the cores are free.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# A stage resumes when its directory already holds a checkpoint; a finished one is skipped.
resume() { if compgen -G "$1/step-*" > /dev/null; then echo --resume "$1"; fi; }
done_() { [ -e "$1/final" ] && [ -e "$1/report.md" ]; }  # final is linked before the report is written
declare -A took
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; took[$name]=$((SECONDS - t0)); }

# The model: MLA (4 heads, kv_lora_rank 64), 1 dense + 2 MoE layers of 8 routed experts (top-2 of 2
# groups, 1 shared), 1 MTP module, hidden 128: ~0.8M parameters, 0.5M active per token. The tiny
# preset (hidden 64, 0.23M) reaches only ~25% on two-operand sums after pretraining: too little for RL
# to build on.
MODEL="hidden_size=128 intermediate_size=256 moe_intermediate_size=64 q_lora_rank=64 kv_lora_rank=64
       qk_nope_head_dim=24 v_head_dim=24"
# Held-out evaluation of every stage: 34 test-split problems × 2 tasks × difficulties 1–3 = 204
# problems, k = 4 samples each at R1's temperature 0.6 / top-p 0.95.
EVAL="--problems 34 --k 4 --temperature 0.6 --top-p 0.95 --max-tokens 160 --greedy --batch 64"

# ---- 1. tokenizer + pretraining -------------------------------------------------------------------
# Data: 60,000 documents "Question: …\nAnswer: <worked steps> \boxed{…}" from the arithmetic and
#   countdown tasks (difficulty 1–3, train split) ≈ 54 tokens each → 3.3M tokens; held-out loss on
#   400 documents of the tasks' test split. A byte-level BPE (single digits) is trained on the same
#   documents plus R1's instruction sentence and R1-Zero's template (so prompts cost ~15 and ~96 tokens).
# Steps: 16 sequences × 256 tokens = 4,096 tokens/step; 2,000 steps = 8.2M tokens ≈ 2.5 epochs.
#   256-token windows, so an R1-Zero prompt and its answer fit the context the model was trained at.
#   LR 3e-3: 50 warmup steps, constant to step 1,000, cosine to 3e-4 (V3 §4.2's shape).
if ! done_ "$OUT/pretrain"; then
timed pretrain $PY -m minke.cli pretrain --out "$OUT/pretrain" $(resume "$OUT/pretrain") \
    --docs 60000 --eval-docs 400 --vocab-size 512 --preset tiny --set $MODEL --seq-len 256 \
    --steps 2000 --batch-size 16 --lr 3e-3 --warmup 50 --decay-from 0.5 \
    --eval-every 500 --save-every 500 --log-every 100
fi

# ---- 2. cold-start SFT ----------------------------------------------------------------------------
# R1's cold start: chat-formatted examples in R1's output form "<think>\n<reasoning>\n</think>\n\n
#   \boxed{answer}", loss on the response only, whole examples packed into 256-token rows with
#   per-example attention masks. 20,000 train problems over both tasks and difficulties 1–3 (~100
#   tokens each → ~8,000 rows); 300 steps × 16 rows ≈ 0.6 epoch.
# The cold start mixes two reasoning styles, half and half (--direct 0.5, chosen per prompt): the worked
#   steps, or only "The answer is N." (as answer keys are written). Both are well-formed R1 outputs, so
#   the format reward cannot tell them apart; only the accuracy reward can, and GRPO has to find out
#   from it that working the steps out pays (response length and accuracy rise together, R1-Zero's
#   lesson). With every example worked (--direct 0) the SFT checkpoint scores higher and GRPO from it
#   barely moves (measured on the previous difficulty scale: README "Stages").
if ! done_ "$OUT/sft"; then
timed sft $PY -m minke.cli sft --model "$OUT/pretrain/final" --out "$OUT/sft" $(resume "$OUT/sft") \
    --examples 20000 --direct 0.5 --seq-len 256 --steps 300 --batch-size 16 --lr 1e-3 --warmup 20 \
    --eval-every 100 --save-every 100 --log-every 50 --eval-problems 0
fi

# ---- 3. GRPO --------------------------------------------------------------------------------------
# Each step: 16 train problems × 8 samples at temperature 1 through the engine (one prefill per
#   problem, forked; ~30 tokens per response); reward = accuracy (the task's checker) + format
#   (<think>…</think> then \boxed{}); group-normalised advantages; one clipped-ratio AdamW step at a constant
#   2e-4 (ε 0.2, no KL: β = 0 keeps no reference model). 100 steps = 12,800 rollouts; 2–3 s a step.
#   (Before the place-value steps the gain leveled off: 34.1 at step 100, 33.2 at 150, 35.2 at 200;
#   lr 4e-4, μ 2, T 0.7, --no-std and --dynamic-sampling measured no better: README "Stages".)
if ! done_ "$OUT/grpo"; then
timed grpo $PY -m minke.cli grpo --model "$OUT/sft/final" --out "$OUT/grpo" $(resume "$OUT/grpo") \
    --steps ${GRPO_STEPS:-100} --prompts 16 --group-size 8 --temperature 1.0 --max-tokens 160 --lr 2e-4 \
    --eval-every 50 --eval-problems 6 --eval-k 2 --save-every 50 --log-every 10
fi

# ---- 4. evaluation of every stage on the same held-out problems -----------------------------------
# The pretrained model is prompted in its own corpus format ("Question: …\nAnswer:"), the chat
# stages through the chat template their tokenizer_config.json carries.
mkdir -p "$OUT/eval"
timed eval_pretrain $PY -m minke.cli eval --model "$OUT/pretrain/final" --format base $EVAL --out "$OUT/eval/pretrain.json"
timed eval_sft $PY -m minke.cli eval --model "$OUT/sft/final" --format chat $EVAL --out "$OUT/eval/sft.json"
timed eval_grpo $PY -m minke.cli eval --model "$OUT/grpo/final" --format chat $EVAL --out "$OUT/eval/grpo.json"

secs=()
for k in "${!took[@]}"; do secs+=(--seconds "$k" "${took[$k]}"); done
$PY -m minke.cli report --out "$OUT" --stage pretrain "$OUT/eval/pretrain.json" --stage sft "$OUT/eval/sft.json" \
    --stage grpo "$OUT/eval/grpo.json" --grpo "$OUT/grpo" "${secs[@]}"

echo
echo "speedrun done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s"
echo "  checkpoints: $OUT/{pretrain,sft,grpo}/final   (minke chat --model $OUT/grpo/final)"
echo "  report:      $OUT/report.md   summary: $OUT/summary.json"
