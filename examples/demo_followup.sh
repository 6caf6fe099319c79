#!/usr/bin/env bash
# Follow-up experiments to `kdtool demo` (examples/demo_report/README.md): from each seed's sft student,
# (a) sft continued for the same 1,000 steps (minillm's compute-matched control) and (b) token-level rkl;
# scored with the task metrics (exact expected validity, greedy validity). Usage: demo_followup.sh DEMO_DIR
set -euo pipefail
demo=${1:?usage: demo_followup.sh DEMO_DIR}
out=$demo/followup
mkdir -p "$out"
flags=(--max-steps 1000 --batch-size 64 --lr 3e-3 --warmup-steps 50 --max-length 128 --eval-every 250 --no-progress)
run() {  # NAME OBJECTIVE SEED
  local name=$1 objective=$2 seed=$3
  local init=$demo/compare/runs/sft-seed$seed
  [ -f "$out/$name-seed$seed/kdtool.json" ] || kdtool distill --objective "$objective" --teacher "$(python -c 'import kdtool.demo as d; print(d.shipped_teacher())')" \
    --student "$init" --data "$demo/data/student_train.jsonl" --eval-data "$demo/data/test.jsonl" \
    --output "$out/$name-seed$seed" --seed "$seed" --overwrite "${flags[@]}" > "$out/$name-seed$seed.log" 2>&1
  python -m kdtool.task_eval --model "$out/$name-seed$seed" --data "$demo/data/test.jsonl" --output "$out/$name-seed$seed.json"
}
export OMP_NUM_THREADS=1
for seed in 1 2 3; do
  run sft-continued sft "$seed" &
  run rkl-from-sft rkl "$seed"
  wait
done
