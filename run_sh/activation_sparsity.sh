#!/usr/bin/env bash
# Activation sparsity through flat minima (spec 2; cdgyp/sparsity) on CIFAR-10, meant for a GPU:
#   1. manipulate (spec 2.6): ViT-B/16 from scratch at 224 px, DB-MLP unclipped, no restricted
#      LayerNorm, activation weird_relu2 = shift(sshaped(relu2, h=1.5), sx, sy) over
#      sx, sy in {+1.6, -1.6} x lr in {1e-4, 1e-5}: Adam, wd 0, gradient clipping 1, 100 epochs,
#      warm-up 5 epochs from 0.1 x lr (per step), batch 64, crop + flip, evaluation every 10
#      epochs; the sign of the shifts should move the activation concentration.
#   2. vanilla vs sparsified ViT-B/16 from scratch (the seed's cifar10.sh: AdamW lr 1e-4, wd
#      0.05, label smoothing 0.11, RandAugment, MixUp 0.2, CutMix 1, clip 1, 150 epochs), with
#      weights every 10 epochs, then augmented flatness over those checkpoints (--experiment=
#      augmented_flatness: batch 128, correctly classified test samples only);
#   3. fine-tuning the vanilla run into the sparsified model (finetuning.sh: 15 epochs, AdamW
#      3e-3, wd 0.3, LoRA r 192, 5 epochs of relu -> jsrelu mixing and of LayerNorm uplift).
# Every run logs activation sparsity, effective gradient sparsity and spectral increase (every
# 25 steps and at every evaluation) and reports FGSM accuracy at eps 1/255 (the seed's
# --adversarial-testing --adversarial-eps 1/255).
#   bash run_sh/activation_sparsity.sh DATA_DIR [BASE_DIR] [--reduced]
# --reduced: the same steps on a CPU in minutes: a small ViT (vit_tiny with width 64, 2 blocks,
# 4 heads, MLP 256) at 32 px on 2000 training images, 3 epochs (2 for the manipulate grid, at
# lr 1e-3 and 1e-4, warm-up 0.5 epochs), no MixUp / CutMix / RandAugment, test set only.
# Killed runs resume when the script is run again; the analysis runs at the end.
set -euo pipefail
usage="DATA_DIR [BASE_DIR] [--reduced]"
options="--reduced"
max_positional=2
source "$(dirname "$0")/args.sh"  # Arguments in any order; DATA_DIR from the env.
data_dir=${positional[0]}
base_dir=${positional[1]:-./output/activation_sparsity}
measure=(--measure=activation_sparsity,effective_gradient_sparsity,spectral_increase
         --log_every=25)
common=(--dataset=cifar10 --data_dir="$data_dir" --trials=1 --valid_size=0
        --attack=fgsm --eps=0.0039216 --sharpness_examples=0 --noprogress
        --base_dir="$base_dir" "${measure[@]}")
model=(--model=vit_b16 --resolution=224)
vanilla_model=("${model[@]}")
sparsified_model=(--model=vit_b16_sparsified --resolution=224)
manipulate_epochs=100 manipulate_lrs="1e-4 1e-5" manipulate_batch=64 manipulate_every=7820
warmup_epochs=5
scratch_epochs=150 scratch_augment=crop,flip,randaugment,mixup,cutmix batch=128
finetune_epochs=15 mixing_epochs=5 lora_rank=192 save_every=10
if [ "$reduced" = "--reduced" ]; then
  common+=(--train_examples=2000)
  model=(--model=vit --vit_preset=tiny --width=64 --depth=2 --heads=4 --mlp_width=256)
  vanilla_model=("${model[@]}" --vit_variant=vanilla)
  sparsified_model=("${model[@]}" --vit_variant=sparsified)
  manipulate_epochs=2 manipulate_lrs="1e-3 1e-4" manipulate_batch=64 manipulate_every=32
  warmup_epochs=0.5
  scratch_epochs=3 scratch_augment=crop,flip batch=64
  finetune_epochs=2 mixing_epochs=1 lora_rank=8 save_every=1
fi

# 1. manipulate.
for lr in $manipulate_lrs; do
  for sx in 1.6 -1.6; do
    for sy in 1.6 -1.6; do
      python -m run_experiments "${common[@]}" "${model[@]}" --experiment=train \
        --db_mlp --zeroth_bias_clipping=inf --norestricted_layer_norm \
        --activation="shift(inner=sshaped(inner=relu2,h=1.5),sx=$sx,sy=$sy)" \
        --optimizer=adam -lr="$lr" --weight_decay=0 --grad_clip_norm=1 --label_smoothing=0 \
        --warmup_epochs="$warmup_epochs" --warmup_init_lr="$(python -c "print($lr * 0.1)")" \
        --schedule_per=iteration --epochs="$manipulate_epochs" \
        --batch_size="$manipulate_batch" --eval_every="$manipulate_every" --augment=crop,flip
    done
  done
done

# 2. Vanilla and sparsified from scratch, then augmented flatness over their checkpoints.
scratch=(--experiment=train --optimizer=adamw -lr=1e-4 --weight_decay=0.05
         --label_smoothing=0.11 --grad_clip_norm=1 --augment="$scratch_augment"
         --epochs="$scratch_epochs" --batch_size="$batch" --save_every_epochs="$save_every")
if [ "$reduced" = "--reduced" ]; then scratch[2]=-lr=1e-3; fi
vanilla=$(python -m run_experiments "${common[@]}" "${vanilla_model[@]}" "${scratch[@]}" \
  | tail -n 1)
sparsified=$(python -m run_experiments "${common[@]}" "${sparsified_model[@]}" "${scratch[@]}" \
  | tail -n 1)
flatness=(--experiment=augmented_flatness --correct_samples_only --batch_size=128)
python -m run_experiments "${common[@]}" "${vanilla_model[@]}" "${flatness[@]}" \
  --pretrained_run="$vanilla"
python -m run_experiments "${common[@]}" "${sparsified_model[@]}" "${flatness[@]}" \
  --pretrained_run="$sparsified"

# 3. Fine-tuning the vanilla run into the sparsified model.
python -m run_experiments "${common[@]}" "${vanilla_model[@]}" --experiment=sparsify_finetune \
  --pretrained_run="$vanilla" --optimizer=adamw -lr=3e-3 --weight_decay=0.3 \
  --label_smoothing=0.11 --grad_clip_norm=1 --epochs="$finetune_epochs" --batch_size="$batch" \
  --activation_mixing_epochs="$mixing_epochs" --layernorm_uplifting_epochs="$mixing_epochs" \
  --lora_rank="$lora_rank"

python -m run_analysis --base_dir="$base_dir"
