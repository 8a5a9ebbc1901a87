#!/usr/bin/env bash
# Robust pruning (issue 26 item 5): which sparse networks stay robust? For each adversarial
# training loss (--adv_loss=pgd_ce, trades, mart; each its own run folders under BASE_DIR),
# a dense network is adversarially trained, then pruned three ways to 10 %, 4.6 %, 2.2 % and
# 1 % of the weights, 2 trials each:
#   lottery ticket  reinit_orig, every layer pruned by 1 - 0.1^(1/3) = 53.6 % per level
#                   (levels 100, 46.4, 21.5, 10, 4.6, 2.2, 1.0 %: the 10 / 5 / 2 / 1 % of
#                   the study as a geometric sequence iterative pruning reaches), each level
#                   adversarially trained from the dense network's initialisation; its level
#                   0 is the dense adversarially trained network;
#   random pruning  random_prune: random masks with the ticket's per-layer counts, from the
#                   original initialisation;
#   HYDRA           --experiment=hydra from the ticket run's dense level (trial 0, level 0)
#                   at each of the ticket's sparsities 1 - (1 - rate)^k (score phase, then
#                   robust fine-tuning, both with the same loss; HYDRA's defaults: 20 + 20
#                   epochs, score lr 0.1, fine-tuning SGD lr 0.01, cosine).
#   MNIST dense-300-100: PGD-10 of 0.05 at eps 0.3 on the true labels, adversarial loss only,
#       Adam 1e-3, 20 epochs per level; AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square)
#       at eps 0, 0.1, 0.2, 0.3, 0.4 (--eps_sweep: robust accuracy against eps, its area) on
#       1000 test images, and at every evaluation (--eval_attacks).
#   CIFAR-10 conv-4 (GPU; `cifar_model` below, resnet18 also runs): PGD-10 of 2/255 at eps
#       8/255, crop + flip, Adam 3e-4, 40 epochs per level; AutoAttack at eps 0, 2, 4, 8,
#       12 /255 on 1000 test images.
# Then run_analysis (tables/robustness_curves.md: AutoAttack accuracy per level and method;
# figures/robustness_area.png, figures/robustness_curves.png).
#   bash run_sh/robust_pruning.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced (MNIST only, no CIFAR-10; 9 min 34 s on a 2-core CPU machine shared with 3 other
# CPU-bound jobs, load 4-7, 2026-12-06; the earlier reduced variant took 24.6 min, most of
# it in AutoAttack at its 34 swept levels, FAB-T's 9 targets x 100 steps alone ~50 s per
# level): 10,000 training images, 3 epochs per level,
# PGD-AT at eps 0.1, not 0.3 (10 steps of 0.025: at eps 0.3 this MLP does not learn in such a
# budget and collapses to ~10 % accuracy), the ticket in 2 levels of 85.3 % (100, 14.7 and
# 2.2 % of the weights), random pruning at those levels, HYDRA at 2.2 % (sparsity 0.978456,
# 2 + 2 epochs), all 2 trials with pgd_ce; the TRADES row is HYDRA at 2.2 % with
# --adv_loss=trades (score phase and fine-tuning) from the same PGD-AT dense network, 1 trial
# (no TRADES or MART tickets, no MART run); AutoAttack with 50 steps, 3 target classes and 100
# Square queries (FAB-T's steps dominate its cost) at eps 0 and 0.1 on the first 200 test
# images; no gradient-masking checks (neither in the runs nor in run_analysis). Most of the
# time is fixed cost per run_experiments call (~20 s start, ~40 s compiling AutoAttack for
# the first level; HYDRA compiles twice), so the reduced study keeps to 4 calls. Every call
# prints its wall time on stderr.
# Killed runs resume when the script is run again.
set -euo pipefail
usage="DATA_DIR [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/robust_pruning}
trials=2
cifar_model=conv-4

# MNIST dense-300-100; mnist EPS STEP_SIZE (default 0.3 0.05).
mnist() {
  common=(--dataset=digits --data_dir="$data_dir" --model=dense-300-100 --trials="$trials"
          --valid_size=0 --label_smoothing=0 --attack=pgd --eps="${1:-0.3}" --pgd_steps=10
          --pgd_step_size="${2:-0.05}" --attack_labels=true
          --adv_train --adv_mix=1.0 --sharpness_examples=0 --noprogress
          --base_dir="$base_dir")
  rate=0.535841  # 1 - 0.1^(1/3): every third level divides the weights by 10.
  prune_iters=6 epochs=20 hydra_epochs=20
  sparsities="0.9 0.953584 0.978456 0.99"  # 1 - (1 - rate)^k, k = 3..6.
  adam=(--optimizer=adam -lr=0.001 --batch_size=128)
  sweep=(--eps_sweep=0,0.1,0.2,0.3,0.4 --eps_sweep_attack=autoattack --eps_sweep_examples=1000)
  evaluation=(--eval_attacks=autoattack --eval_examples=1000)
}
# CIFAR-10 conv-4 (full protocol only).
cifar10() {
  common=(--dataset=cifar10 --data_dir="$data_dir" --model="$cifar_model" --trials="$trials"
          --valid_size=0 --label_smoothing=0 --augment=crop,flip
          --attack=pgd --eps=0.0313725 --pgd_steps=10 --pgd_step_size=0.0078431
          --attack_labels=true --adv_train --adv_mix=1.0 --sharpness_examples=0 --noprogress
          --base_dir="$base_dir")
  rate=0.535841 prune_iters=6 epochs=40 hydra_epochs=20
  sparsities="0.9 0.953584 0.978456 0.99"
  adam=(--optimizer=adam -lr=0.0003 --batch_size=128)
  sweep=(--eps_sweep=0,0.0078431,0.0156863,0.0313725,0.0470588 --eps_sweep_attack=autoattack
         --eps_sweep_examples=1000)
  evaluation=(--eval_examples=1000)
}
mnist_reduced() {
  mnist 0.1 0.025
  common+=(--train_examples=10000 --nomasking_checks)
  rate=0.853220  # 1 - sqrt(0.0215443): 2.2 % of the weights in 2 levels.
  prune_iters=2 epochs=3 hydra_epochs=2
  sparsities="0.978456"
  sweep=(--eps_sweep=0,0.1
         "--eps_sweep_attack=autoattack(steps=50,n_target_classes=3,n_queries=100)"
         --eps_sweep_examples=200)
  evaluation=(--eval_examples=1000)
}

run() {  # run LABEL FLAGS...: one run_experiments call; prints its run folder, returns its
  local label=$1 start=$SECONDS status=0  # status (also inside $(...), where set -e is off).
  shift
  python -m run_experiments "${common[@]}" "${sweep[@]}" "${evaluation[@]}" "$@" \
    | tail -n 1 || status=$?
  echo "robust_pruning: $label: $((SECONDS - start)) s" >&2
  return "$status"
}
ticket_run() {  # ticket_run LOSS: the lottery ticket (its level 0: the dense network).
  run "$1 reinit_orig" --experiment=reinit_orig --adv_loss="$1" "${adam[@]}" \
    --prune_rate="$rate" --prune_rate_output="$rate" --prune_iters="$prune_iters" \
    --epochs="$epochs"
}
random_run() {  # random_run LOSS TICKET
  run "$1 random_prune" --experiment=random_prune --adv_loss="$1" --ticket_run="$2" \
    "${adam[@]}" --prune_rate="$rate" --prune_rate_output="$rate" \
    --prune_iters="$prune_iters" --epochs="$epochs" > /dev/null
}
hydra_runs() {  # hydra_runs LOSS PRETRAINED [FLAGS...]: HYDRA at every sparsity (its own
  local loss=$1 pretrained=$2 sparsity  # optimizers).
  shift 2
  for sparsity in $sparsities; do
    run "$loss hydra $sparsity" --experiment=hydra --adv_loss="$loss" \
      --pretrained_run="$pretrained" --sparsity="$sparsity" --mask_epochs="$hydra_epochs" \
      --epochs="$hydra_epochs" "$@" > /dev/null
  done
}
study() {  # study LOSS: ticket, random pruning and HYDRA, all with one loss.
  local ticket
  ticket=$(ticket_run "$1")
  random_run "$1" "$ticket"
  hydra_runs "$1" "$ticket"
}

if [ "$reduced" = "--reduced" ]; then
  mnist_reduced
  ticket=$(ticket_run pgd_ce)
  random_run pgd_ce "$ticket"
  hydra_runs pgd_ce "$ticket"
  hydra_runs trades "$ticket" --trials=1  # The TRADES wiring, one trial.
  python -m run_analysis --base_dir="$base_dir" --nomasking_checks
else
  for dataset in mnist cifar10; do
    "$dataset"
    for loss in pgd_ce trades mart; do
      study "$loss"
    done
  done
  python -m run_analysis --base_dir="$base_dir"
fi
