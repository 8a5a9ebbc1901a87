#!/usr/bin/env bash
# Robust pruning (issue 26 item 5): which sparse networks stay robust? On MNIST dense-300-100,
# PGD adversarial training (eps 0.3, 10 steps of 0.05, true labels, adversarial loss only),
# then three ways to 10 %, 4.6 %, 2.2 % and 1 % of the weights, 2 trials each:
#   lottery ticket  reinit_orig, every layer pruned by 1 - 0.1^(1/3) = 53.6 % per level
#                   (levels 100, 46.4, 21.5, 10, 4.6, 2.2, 1.0 %: the 10 / 5 / 2 / 1 % of
#                   the study as a geometric sequence iterative pruning reaches), each level
#                   adversarially trained from the dense network's initialisation;
#   random pruning  random_prune: random masks with the ticket's per-layer counts, from the
#                   original initialisation;
#   HYDRA           --experiment=hydra from the dense PGD-trained network at each of the
#                   ticket's sparsities (score phase, then robust fine-tuning; HYDRA's
#                   defaults: 20 + 20 epochs, score lr 0.1, fine-tuning lr 0.01).
# Every level's final network is attacked with AutoAttack (standard: APGD-CE, APGD-T, FAB-T,
# Square) at eps 0, 0.1, 0.2, 0.3, 0.4 (--eps_sweep: robust accuracy against eps, its area);
# the full protocol also adds AutoAttack at every evaluation (--eval_attacks). Then
# run_analysis. TRADES / MART rows come once the step library uses --adv_loss.
#   bash run_sh/robust_pruning.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced: 2000 training images, 3 epochs per level, the ticket to 2.2 % (5 levels), HYDRA
# at 10 % and 2.2 % (2 + 2 epochs), AutoAttack (Square: 100 queries) at eps 0.3 on the first
# 200 test images, no gradient-masking checks (CPU minutes).
# Killed runs resume when the script is run again.
set -euo pipefail
usage="DATA_DIR [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/robust_pruning}
rate=0.535841  # 1 - 0.1^(1/3): every third level divides the weights by 10.
common=(--dataset=digits --data_dir="$data_dir" --model=dense-300-100 --trials=2
        --valid_size=0 --label_smoothing=0
        --attack=pgd --eps=0.3 --pgd_steps=10 --pgd_step_size=0.05 --attack_labels=true
        --adv_train --adv_mix=1.0 --sharpness_examples=0 --noprogress --base_dir="$base_dir")
epochs=20 prune_iters=6 hydra_epochs=20
sparsities="0.9 0.953584 0.978456 0.99"  # 1 - (1 - rate)^k, k = 3..6.
sweep=(--eps_sweep=0,0.1,0.2,0.3,0.4 --eps_sweep_attack=autoattack --eps_sweep_examples=1000)
evaluation=(--eval_attacks=autoattack --eval_examples=1000)
if [ "$reduced" = "--reduced" ]; then
  common+=(--train_examples=2000 --nomasking_checks)
  epochs=3 prune_iters=5 hydra_epochs=2
  sparsities="0.9 0.978456"
  sweep=(--eps_sweep=0.3 "--eps_sweep_attack=autoattack(n_queries=100)"
         --eps_sweep_examples=200)
  evaluation=()
fi
run() {
  python -m run_experiments "${common[@]}" "${sweep[@]}" ${evaluation[@]+"${evaluation[@]}"} \
    "$@" | tail -n 1
}
# The dense network and the lottery levels: Adam; HYDRA keeps its own optimizers (seed defaults).
adam=(--optimizer=adam -lr=0.001 --batch_size=128)
lottery=("${adam[@]}" --prune_rate="$rate" --prune_rate_output="$rate" --prune_iters="$prune_iters"
         --epochs="$epochs")
dense=$(run --experiment=train "${adam[@]}" --epochs="$epochs")
ticket=$(run --experiment=reinit_orig "${lottery[@]}")
run --experiment=random_prune --ticket_run="$ticket" "${lottery[@]}" > /dev/null
for sparsity in $sparsities; do
  run --experiment=hydra --pretrained_run="$dense" --sparsity="$sparsity" \
    --mask_epochs="$hydra_epochs" --epochs="$hydra_epochs" > /dev/null
done
python -m run_analysis --base_dir="$base_dir"
