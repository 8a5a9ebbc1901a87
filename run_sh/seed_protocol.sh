#!/usr/bin/env bash
# The full protocol of "The Search for Sparse, Robust Neural Networks" (robust-sparse-networks):
# MNIST and Fashion-MNIST x {reinit_orig, reinit_rand, reinit_none} x {FGSM, PGD}
# x {natural, adversarial training}; dense-300-100, 5 trials, 20 pruning iterations of
# 50000 training iterations, evaluation every 500 (the seed's flag defaults otherwise).
#   bash run_sh/seed_protocol.sh DATA_DIR [BASE_DIR]
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
usage="DATA_DIR [BASE_DIR]"
options=""
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output}
for dataset in digits fashion; do
  for experiment in reinit_orig reinit_rand reinit_none; do
    for attack in fgsm pgd; do
      for adv in --noadv_train --adv_train; do
        python -m run_experiments --dataset="$dataset" --data_dir="$data_dir" \
          --model=dense-300-100 --experiment="$experiment" --attack="$attack" "$adv" \
          --trials=5 --train_iters=50000 --prune_iters=20 --eval_every=500 \
          --base_dir="$base_dir"
      done
    done
  done
done
python -m run_analysis --base_dir="$base_dir"
