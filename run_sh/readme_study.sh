#!/usr/bin/env bash
# The README's lottery-ticket study: MNIST dense-300-100, the ticket (reinit_orig) against random
# reinitialisation (reinit_rand, the seed's control) and the ticket's masks with a fresh
# initialisation (random_reinit, the lottery-ticket paper's), natural and FGSM-adversarial
# training (eps 0.3), 5000 iterations per level, 12 pruning iterations (down to 6.9 % of the
# weights), 2 trials; every evaluation attacks the true labels with FGSM (--attack) and PGD-10
# (--eval_attacks), intermediate evaluations on the first 1000 images, the last of each level on
# the full validation and test sets. Then the analysis; its figures are the README's.
#   bash run_sh/readme_study.sh DATA_DIR [BASE_DIR]
# About 40 minutes on 2 CPU cores. Killed runs resume when the script is run again.
set -euo pipefail
usage="DATA_DIR [BASE_DIR]"
options=""
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/readme_study}
common=(--dataset=digits --data_dir="$data_dir" --model=dense-300-100 --trials=2
        --prune_iters=12 --train_iters=5000 --eval_every=1000 --eval_examples=1000
        --attack=fgsm --eps=0.3 --attack_labels=true --eval_attacks=pgd
        --pgd_steps=10 --pgd_step_size=0.05 --sharpness_examples=0 --noprogress
        --base_dir="$base_dir")
for mode in --noadv_train --adv_train; do
  ticket=$(python -m run_experiments "${common[@]}" "$mode" --experiment=reinit_orig | tail -n 1)
  python -m run_experiments "${common[@]}" "$mode" --experiment=reinit_rand
  python -m run_experiments "${common[@]}" "$mode" --experiment=random_reinit \
    --ticket_run="$ticket"
done
python -m run_analysis --base_dir="$base_dir" --data_dir="$data_dir"
