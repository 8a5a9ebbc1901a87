#!/usr/bin/env bash
# The SSAM seed's seven README commands (spec 4; Mi-Peng/Systematic-Investigation-of-Sparse-
# Perturbed-Sharpness-Aware-Minimization-Optimizer) on the engine: CIFAR ResNet-18, 200 epochs,
# batch 128, SGD lr 0.05 momentum 0.9, cosine, crop + flip + cutout, SSAM's normalisation, seed
# 1234, test set only; SGD (wd 5e-4), then with wd 1e-3 and rho 0.2: SAM, SSAM-F unstructured /
# structured / 2:4 (sparsity 0.5, 128 Fisher samples, refreshed every epoch), implicit
# structured / 2:4. Every run also logs its measured sharpness. Meant for a GPU.
#   bash run_sh/ssam_protocol.sh DATA_DIR [cifar10|cifar100] [BASE_DIR] [--reduced]
# --reduced: conv-bn on 2000 CIFAR images for 2 epochs, 32 Fisher samples (CPU minutes).
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
usage="DATA_DIR [cifar10|cifar100] [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=3
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
dataset=${positional[1]:-cifar100}
base_dir=${positional[2]:-./output/ssam_${dataset}}
size=(--model=resnet18 --epochs=200)
samples=128
if [ "$reduced" = "--reduced" ]; then
  size=(--model=conv-bn --epochs=2 --train_examples=2000 --sharpness_examples=500)
  samples=32
fi
common=(--dataset="$dataset" --data_dir="$data_dir" --experiment=train "${size[@]}" --trials=1
        --seed=1234 --batch_size=128 --valid_size=0 -lr=0.05 --momentum=0.9
        --lr_schedule=cosine --augment=crop,flip,cutout --normalize=cifar_ssam
        --label_smoothing=0 --drop_last --attack=none --noprogress --base_dir="$base_dir")
sam=(--weight_decay=1e-3 --rho=0.2)
fisher=(--num_samples="$samples" --update_freq=1)
run() { python -m run_experiments "${common[@]}" "$@"; }
run --optimizer=sgd --weight_decay=5e-4
run --optimizer=sam-sgd "${sam[@]}"
run --optimizer=ssamf-sgd "${sam[@]}" --pattern=unstructured --sparsity=0.5 "${fisher[@]}"
run --optimizer=ssamf-sgd "${sam[@]}" --pattern=structured --sparsity=0.5 "${fisher[@]}"
run --optimizer=ssamf-sgd "${sam[@]}" --pattern=nm --n_structured=2 --m_structured=4 \
  "${fisher[@]}"
run --optimizer=sam-sgd "${sam[@]}" --pattern=structured --sparsity=0.5 "${fisher[@]}" \
  --implicit
run --optimizer=sam-sgd "${sam[@]}" --pattern=nm --n_structured=2 --m_structured=4 \
  "${fisher[@]}" --implicit
python -m run_analysis --base_dir="$base_dir"
