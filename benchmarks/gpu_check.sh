#!/usr/bin/env bash
# One-shot GPU check (one H100/H200, ≤ 8 min): writes one Markdown report.
#
#   bash benchmarks/gpu_check.sh [REPORT.md]      # default: ${OUT:-.}/gpu_check.md
#   DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/dry.md   # dry run of the code paths on CPU
#
# In order (the most informative first, in case the time runs out):
#   1. engine parity at V = 151,936: chunked vs plain loss and fp32 gradients, bf16 lazy teacher,
#      soft-capped tied head, padded V; peak memory of each;
#   2. two-step distill + --resume (1 step, then resume to 2) vs an uninterrupted 2-step run on CUDA
#      for fkl, atkd, slim and minillm, on a tiny random Qwen2 pair saved locally;
#   3. minillm's KV-cached bf16 rollout log-probs vs a full-forward recompute;
#   4. cache-logits on CUDA and training from the cache;
#   5. eval rougel on CUDA twice with one seed (the scores must be equal);
#   issue #14's GPU items:
#   6. the CUDA tests (`pytest -m gpu`) and the fused engine on CUDA (fp32, bf16 autocast) against
#      the plain loss on CPU in fp64;
#   7. one training step at Qwen2.5 0.5B-student / 1.5B-teacher shapes (random weights): peak memory,
#      tokens/s and MFU of fkl against SFT of the same student;
#   8. minillm's rollout tokens/s against HF `generate` of the teacher alone, same shapes;
#   9. NCCL start-up with one rank: a 2-step distill under torchrun on the tiny pair.
# Each step has its own time limit and its failure is reported, not fatal.
set -uo pipefail

REPORT=${1:-${OUT:-.}/gpu_check.md}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
DEV=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of the code paths (numbers meaningless)
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$(dirname "$REPORT")"

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
# run LIMIT_S CMD...: append the command's stdout to the report, its tail on failure
run() {
  local limit=$1
  shift
  local start=$SECONDS
  if timeout "$limit" "$@" >"$WORK/out" 2>"$WORK/err"; then
    cat "$WORK/out" >>"$REPORT"
    printf '\n(%ss)\n' "$((SECONDS - start))" >>"$REPORT"
  else
    printf '**FAILED (exit %s after %ss):** `%s`\n\n```\n' "$?" "$((SECONDS - start))" "$*" >>"$REPORT"
    tail -n 25 "$WORK/err" >>"$REPORT"
    printf '```\n' >>"$REPORT"
  fi
}
KD=("$PY" -m kdtool)  # an array, not a function: `timeout` runs programs only

{
  echo "# kdtool GPU check"
  echo
  echo "- $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}")')"
} >"$REPORT"

section "1. Engine parity and memory (CUDA, bf16 autocast)"
run 150 "$PY" "$HERE/gpu_check.py" engine --device "$DEV" --vocab "${VOCAB:-151936}" --rows "${ROWS:-2048}"

section "2. distill + --resume on CUDA (tiny random Qwen2, padded V, tied student)"
run 60 "$PY" "$HERE/gpu_check.py" models --output "$WORK/m"
M=$WORK/m
# A constant LR: a 1-step run's cosine schedule ends at 0, which its resumed step would start from.
printf 'scheduler: constant\n' >"$WORK/conf.yaml"
COMMON=(--config "$WORK/conf.yaml" --teacher "$M/teacher" --student "$M/student" --data "$M/data/train.jsonl" --device "$DEV"
  --batch-size 8 --lr 1e-3 --eval-every 100 --save-every 1 --no-progress)
echo "| objective | 2 steps | 1 + resume to 2 | max abs. Δ weight |" >>"$REPORT"
echo "|---|---|---|---|" >>"$REPORT"
for obj in fkl atkd slim minillm; do
  opts=()
  [ "$obj" = minillm ] && opts=(-O rollout_batch_size=8 -O inner_epochs=1 -O max_new_tokens=32)
  a=$WORK/run-$obj-2 b=$WORK/run-$obj-1
  ra=ok rb=ok
  timeout 90 "${KD[@]}" distill --objective "$obj" "${opts[@]}" "${COMMON[@]}" --output "$a" --max-steps 2 \
    >"$WORK/$obj.log" 2>&1 || ra="FAILED"
  timeout 90 "${KD[@]}" distill --objective "$obj" "${opts[@]}" "${COMMON[@]}" --output "$b" --max-steps 1 \
    >>"$WORK/$obj.log" 2>&1 &&
    timeout 90 "${KD[@]}" distill --objective "$obj" "${opts[@]}" "${COMMON[@]}" --output "$b" --max-steps 2 --resume \
      >>"$WORK/$obj.log" 2>&1 || rb="FAILED"
  d=$([ "$ra$rb" = okok ] && "$PY" "$HERE/gpu_check.py" compare "$a" "$b" 2>/dev/null || echo "-")
  echo "| $obj | $ra | $rb | $d |" >>"$REPORT"
  if [ "$ra$rb" != okok ]; then
    printf '\n```\n' >>"$REPORT"
    tail -n 15 "$WORK/$obj.log" >>"$REPORT"
    printf '```\n' >>"$REPORT"
  fi
done

section "3. minillm rollout log-probs"
run 120 "$PY" "$HERE/gpu_check.py" rollout --models "$M" --device "$DEV"

section "4. cache-logits and training from the cache (CUDA)"
run 90 "${KD[@]}" cache-logits --teacher "$M/teacher" --data "$M/data/train.jsonl" --output "$WORK/cache" --top-k 16
run 90 "${KD[@]}" distill --objective slim --teacher-cache "$WORK/cache" --student "$M/student" \
  --data "$M/data/train.jsonl" --output "$WORK/from-cache" --device "$DEV" --max-steps 4 --batch-size 8 --no-progress
[ -f "$WORK/from-cache/kdtool.json" ] && { echo '```json' && cat "$WORK/from-cache/kdtool.json" && echo '```'; } >>"$REPORT"

section "5. eval rougel on CUDA, twice with one seed"
for i in 1 2; do
  run 90 "${KD[@]}" eval rougel --model "$WORK/run-fkl-2" --data "$M/data/test.jsonl" --seeds 1 --device "$DEV" \
    --output "$WORK/pred-$i.jsonl" --no-progress
done
run 30 "$PY" "$HERE/gpu_check.py" same-eval "$WORK/pred-1.jsonl" "$WORK/pred-2.jsonl"

section "6. CUDA tests and the fused engine on CUDA vs a CPU reference"
if [ "$DEV" = cuda ]; then
  run 90 "$PY" -m pytest -q -m gpu "$HERE/../tests" -p no:cacheprovider
fi
run 60 "$PY" "$HERE/gpu_check.py" cuda-vs-cpu --device "$DEV"

TINY=()
[ "$DEV" = cuda ] || TINY=(--tiny)  # the dry run: tiny shapes
section "7. Distillation vs SFT at Qwen2.5 0.5B / 1.5B shapes: peak memory, tokens/s, MFU"
run 120 "$PY" "$HERE/gpu_check.py" qwen --device "$DEV" "${TINY[@]}"

section "8. minillm rollout vs HF generate of the teacher alone"
run 90 "$PY" "$HERE/gpu_check.py" rollout-speed --device "$DEV" "${TINY[@]}"

section "9. NCCL start-up with one rank (torchrun, 2 steps)"
start=$SECONDS  # the backend follows the device: NCCL on CUDA, gloo in the CPU dry run
if timeout 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m kdtool distill \
  --objective fkl "${COMMON[@]}" --output "$WORK/ddp1" --max-steps 2 >"$WORK/ddp.log" 2>&1; then
  echo "- torchrun, 1 rank, 2 steps: ok, $((SECONDS - start)) s from launch to exit (process start, NCCL init, 2 steps, save)" >>"$REPORT"
  grep -m1 -i "nccl\|backend\|world" "$WORK/ddp.log" >>"$REPORT" || true
else
  printf '**FAILED** after %ss\n\n```\n' "$((SECONDS - start))" >>"$REPORT"
  tail -n 20 "$WORK/ddp.log" >>"$REPORT"
  printf '```\n' >>"$REPORT"
fi

printf '\n(total %ss)\n' "$SECONDS" >>"$REPORT"
rm -rf "$WORK"
echo "wrote $REPORT"
