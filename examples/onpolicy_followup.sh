#!/usr/bin/env bash
# On-policy rkl (--responses student, GKD with lmbda = 1) against rkl on the references, on the demo's
# task and budget, 3 training seeds: (a) from the random student, (b) from each seed's sft student.
# Usage: onpolicy_followup.sh DEMO_DIR   (DEMO_DIR from `kdtool demo --output DEMO_DIR`: its data and init)
set -euo pipefail
demo=${1:?usage: onpolicy_followup.sh DEMO_DIR}
teacher=$(python -c 'import kdtool.demo as d; print(d.shipped_teacher())')
common=(--teacher "$teacher" --student "$demo/init/student" --data "$demo/data/student_train.jsonl"
  --eval-data "$demo/data/test.jsonl" --seeds 1,2,3 --eval-seeds 10,20,30 --max-new-tokens 16
  --eval-batch-size 100 --threads 1 --jobs 2 --primary-metric valid --metrics-module kdtool.task_eval
  --max-steps 1000 --batch-size 64 --lr 3e-3 --warmup-steps 50 --max-length 128 --eval-every 250)
on_policy='--responses student --max-new-tokens 16'
kdtool compare --objectives "rkl,rkl-on-policy=rkl" --objective-args "rkl-on-policy=$on_policy" \
  --baseline rkl --output "$demo/onpolicy_from_scratch" "${common[@]}"
kdtool compare --objectives "sft,rkl-from-sft=rkl,rkl-on-policy-from-sft=rkl" \
  --objective-args "rkl-on-policy-from-sft=$on_policy" --init-from rkl-from-sft=sft \
  --init-from rkl-on-policy-from-sft=sft --baseline rkl-from-sft --output "$demo/onpolicy_from_sft" "${common[@]}"
