#!/usr/bin/env bash
# CIFAR-10 ResNet-18 baseline on the engine: SGD (momentum 0.9, PyTorch weight decay 5e-4),
# lr 0.1 with cosine annealing over 200 epochs, batch 128, RandomCrop(32, 4) + flip, then a
# PGD evaluation of the result (the SSAM / AutoReP baselines' recipe; meant for a GPU).
#   bash run_sh/cifar10_resnet18_train.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced: conv-bn on the first 2000 images for 2 epochs, minutes on 2 CPU cores.
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
data_dir=${1:?usage: $0 DATA_DIR [BASE_DIR] [--reduced]}
base_dir=${2:-./output/cifar10_resnet18}
size=(--model=resnet18 --epochs=200)
if [ "${3:-}" = "--reduced" ]; then
  size=(--model=conv-bn --epochs=2 --train_examples=2000 --valid_size=1000)
fi
python -m run_experiments --dataset=cifar10 --data_dir="$data_dir" --experiment=train \
  "${size[@]}" --trials=1 --batch_size=128 --optimizer=sgd -lr=0.1 --momentum=0.9 \
  --weight_decay=5e-4 --lr_schedule=cosine --augment=crop_flip --label_smoothing=0 \
  --attack=pgd --eps=0.03137 --pgd_step_size=0.00784 --pgd_steps=10 --noprogress \
  --base_dir="$base_dir"
python -m run_analysis --base_dir="$base_dir"
