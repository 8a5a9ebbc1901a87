#!/usr/bin/env bash
# AutoReP's ReLU-reduction protocol (spec 3; harveyp123/AutoReP) on the engine, with robust
# accuracy at every evaluation: a CIFAR-10 resnet18_maxpool baseline (400 epochs, SGD lr 0.1,
# momentum 0.9, wd 5e-4, cosine to 1e-5, crop + flip, ImageNet normalisation, batch 128, seed 2,
# test set only), then ReLU reduction from it (--experiment=relu_prune: 100 mask epochs, then
# 100 fine-tuning epochs at lr 0.01, wd 1e-3):
#   spgrad (identity_relu_grad) at sparsity 0.5 / 0.9 / 0.95, mask dropout 0.01 and 0;
#   spgrad with hysteresis 0.001 / 0.002 / 0.003 (0.003 at every sparsity);
#   poly 0.1x^2 + 0.5x (50 mask epochs, w_mask_lr 0.01) and autopoly degree 1 / 2 (relay 0.003).
# Every evaluation also attacks the test set with PGD-10 at eps 2/255. Meant for a GPU.
#   bash run_sh/relu_protocol.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced: 2000 training images, a 4-epoch baseline, 4 mask epochs (alpha_lr 0.02 and lamda
# 100 so that the masks reach the target in 64 steps instead of 39,100), 2 fine-tuning epochs,
# FGSM evaluation, spgrad at sparsity 0.5 and poly at 0.9 (CPU minutes).
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
usage="DATA_DIR [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/relu_reduction}
common=(--dataset=cifar10 --data_dir="$data_dir" --model=resnet18_maxpool --trials=1 --seed=2
        --batch_size=128 --valid_size=0 --augment=crop,flip --normalize=imagenet
        --label_smoothing=0 --optimizer=sgd --momentum=0.9 --lr_schedule=cosine --eta_min=1e-5
        --sharpness_examples=0 --noprogress --base_dir="$base_dir")
attack=(--attack=pgd --eps=0.0078431 --pgd_steps=10 --pgd_step_size=0.0019608)
baseline_epochs=400 mask_epochs=100 poly_mask_epochs=50 finetune_epochs=100 alpha_lr=2e-4
lamda=10
if [ "$reduced" = "--reduced" ]; then
  common+=(--train_examples=2000)
  attack=(--attack=fgsm --eps=0.0078431)
  baseline_epochs=4 mask_epochs=4 poly_mask_epochs=4 finetune_epochs=2 alpha_lr=0.02 lamda=100
fi
baseline=$(python -m run_experiments "${common[@]}" "${attack[@]}" --experiment=train \
  --epochs="$baseline_epochs" -lr=0.1 --weight_decay=5e-4 | tail -n 1)
prune() {
  python -m run_experiments "${common[@]}" "${attack[@]}" --experiment=relu_prune \
    --pretrained_run="$baseline" --alpha_lr="$alpha_lr" --lamda="$lamda" \
    --epochs="$finetune_epochs" -lr=0.01 \
    --weight_decay=1e-3 "$@"
}
spgrad=(--relu_replacement=identity_relu_grad --mask_epochs="$mask_epochs" --w_mask_lr=0.02)
poly=(--relu_replacement=poly --scale_x2=0.1 --scale_x=0.5 --mask_epochs="$poly_mask_epochs"
      --w_mask_lr=0.01)
if [ "$reduced" = "--reduced" ]; then
  prune "${spgrad[@]}" --relu_sparsity=0.5 --mask_dropout=0.01
  prune "${poly[@]}" --relu_sparsity=0.9
else
  for sparsity in 0.5 0.9 0.95; do
    for dropout in 0.01 0; do
      prune "${spgrad[@]}" --relu_sparsity="$sparsity" --mask_dropout="$dropout"
    done
    prune "${spgrad[@]}" --relu_sparsity="$sparsity" --mask_dropout=0.01 \
      --hysteresis_threshold=0.003
    prune "${poly[@]}" --relu_sparsity="$sparsity"
    for degree in 1 2; do
      prune --relu_replacement="autopoly$degree" --mask_epochs="$mask_epochs" --w_mask_lr=0.02 \
        --relu_sparsity="$sparsity" --hysteresis_threshold=0.003 --mask_dropout=0.01
    done
  done
  for threshold in 0.001 0.002; do
    prune "${spgrad[@]}" --relu_sparsity=0.5 --mask_dropout=0.01 \
      --hysteresis_threshold="$threshold"
  done
fi
python -m run_analysis --base_dir="$base_dir"
