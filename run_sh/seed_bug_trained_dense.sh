#!/usr/bin/env bash
# The seed's released code, bug included: reinit_orig rewinds to the *trained* dense
# weights instead of the random initialisation (spec 1.4). Compare with seed_protocol.sh.
#   bash run_sh/seed_bug_trained_dense.sh DATA_DIR [BASE_DIR]
set -euo pipefail
usage="DATA_DIR [BASE_DIR]"
options=""
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output}
for attack in fgsm pgd; do
  for adv in --noadv_train --adv_train; do
    python -m run_experiments --dataset=digits --data_dir="$data_dir" \
      --experiment=reinit_orig --rewind_to=trained_dense --attack="$attack" "$adv" \
      --trials=5 --train_iters=50000 --prune_iters=20 --eval_every=500 --base_dir="$base_dir"
  done
done
