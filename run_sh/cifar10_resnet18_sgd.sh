#!/usr/bin/env bash
# SSAM's SGD baseline (spec 4.5) on the engine: CIFAR-10 ResNet-18 (the kuangliu CIFAR one),
# 200 epochs, batch 128, SGD lr 0.05 with momentum 0.9 and PyTorch weight decay 5e-4, cosine
# annealing to 0, RandomCrop(32, 4) + flip, SSAM's normalisation as the model's first layer,
# no label smoothing, seed 1234, evaluated on the test set only (--valid_size=0). Meant for a
# GPU; the seed's papers report about 96 % test accuracy for this baseline.
#   bash run_sh/cifar10_resnet18_sgd.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced: the first 5000 training images for 2 epochs (minutes on 2 CPU cores).
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
usage="DATA_DIR [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/cifar10_resnet18_sgd}
size=(--epochs=200)
if [ "$reduced" = "--reduced" ]; then
  size=(--epochs=2 --train_examples=5000)
fi
python -m run_experiments --dataset=cifar10 --data_dir="$data_dir" --model=resnet18 \
  --experiment=train "${size[@]}" --trials=1 --seed=1234 --batch_size=128 --valid_size=0 \
  --optimizer=sgd -lr=0.05 --momentum=0.9 --weight_decay=5e-4 --lr_schedule=cosine \
  --augment=crop,flip --normalize=cifar_ssam --label_smoothing=0 --drop_last --attack=none \
  --noprogress --base_dir="$base_dir"
python -m run_analysis --base_dir="$base_dir"
