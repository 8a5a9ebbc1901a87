#!/usr/bin/env bash
# dense-300-100 trained naturally on MNIST for 5000 iterations: test accuracy >= 97.5 %.
#   bash run_sh/reproduce_mnist_accuracy.sh DATA_DIR [BASE_DIR]
# DATA_DIR holds mnist/ with the four official IDX .gz files.
set -euo pipefail
usage="DATA_DIR [BASE_DIR]"
options=""
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/reproduce}
run_dir=$(python -m run_experiments --dataset=digits --data_dir="$data_dir" \
  --model=dense-300-100 --experiment=no_pruning --attack=fgsm --trials=1 \
  --train_iters=5000 --eval_every=500 --noprogress --base_dir="$base_dir" | tail -n 1)
python - "$run_dir" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/trial_0/prune_iter_0/test.csv")))
acc = 100 * float(rows[-1]["acc"])
print(f"test accuracy after {rows[-1]['iteration']} iterations: {acc:.2f} %")
sys.exit(0 if acc >= 97.5 else 1)
PY
