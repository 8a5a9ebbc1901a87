"""Fine-tuning a trained vanilla ViT into the sparsified one (spec 2.4, 2.6).

`--experiment=sparsify_finetune --pretrained_run=DIR` starts from the final
weights of DIR (trial 0, level 0: a finished `--model=vit...` run, vanilla)
and trains one level of the same ViT turned sparsified, as the seed's
`imagenet1k/finetuning.sh`:

  * the MLPs become DB-MLPs: a zero-initialised zeroth bias per MLP (new
    variables; `--zeroth_bias_position`, `--zeroth_bias_clipping`);
  * every ln_2 becomes a `RestrictedLayerNorm` in fine-tuning mode: its beta
    frozen and `|gamma| <- max(|gamma|, min(step / U, 1))` after every update,
    U = `--layernorm_uplifting_epochs` epochs of steps;
  * the MLP activation moves from relu to jsrelu: `mixed(steps=S)`, S =
    `--activation_mixing_epochs` epochs (k counts training calls of the
    model: one per step, two with SAM), or jsrelu at once with
    `--nomixed_activation`; an explicit non-relu `--activation` is used as
    given;
  * `--lora_rank=r`: Keras' `enable_lora(r)` on every dense layer of the
    encoder blocks (attention projections, MLP key and value), whose kernels
    then freeze; biases, LayerNorms, zeroth biases, the patch embedding and
    the head train in full. Unset: everything trains.

`--db_mlp=false` or `--restricted_layer_norm=false` leave that part out (an
ablation). The optimizer, schedule and length are the flags' (the seed: AdamW
3e-3, weight decay 0.3, 15 epochs, LoRA r 192, 5 + 5 epochs of mixing and
uplift). train.csv logs `portion_of_jsrelu`, `zeroth_biases` and
`restricted_layer_norm_scaling_factors` at every evaluation (the runner logs
them for every model that has the modules).
"""

import numpy as np

from robust_sparse.core.run_folder import finished_run
from robust_sparse.experiments.registry import EXPERIMENTS, Experiment

# Variables the sparsified model has and a vanilla checkpoint lacks: the zeroth
# biases, the uplift and mixing counters, LoRA's factors.
_NEW_VARIABLES = ("uplift_step", "lora_kernel_a", "lora_kernel_b", "step")


def _is_new(path):
  layer, _, name = path.rpartition("/")
  return name in _NEW_VARIABLES or layer.split("/")[-1].endswith("_zeroth_bias")


@EXPERIMENTS.register("sparsify_finetune")
class SparsifyFinetune(Experiment):
  """One level: the vanilla run's weights, fine-tuned in the sparsified architecture."""
  prunes = False

  def levels(self):
    return 1

  def check(self, dataset, num_train):
    super().check(dataset, num_train)
    hp = self.hparams
    if not hp.pretrained_run:
      raise ValueError("sparsify_finetune needs --pretrained_run=DIR, a finished vanilla "
                       "ViT run")
    if not hp.model.startswith("vit"):
      raise ValueError(f"sparsify_finetune fine-tunes a ViT (--model=vit or vit_<preset>), "
                       f"got --model={hp.model}")
    if hp.vit_variant == "sparsified" or hp.model.endswith("_sparsified"):
      raise ValueError("sparsify_finetune builds the sparsified model from the vanilla "
                       "one: give the vanilla --model / --vit_variant of --pretrained_run")
    _, self._pretrained = finished_run(hp.pretrained_run, "--pretrained_run", matches=hp,
                                       fields=("dataset", "resolution", "normalize"))
    self._steps_per_epoch = hp.steps_per_epoch(num_train)

  def _steps(self, epochs):
    return max(1, int(round(epochs * self._steps_per_epoch)))

  def activation(self, level, num_train):
    hp = self.hparams
    if hp.activation != "relu":
      return hp.activation
    if hp.mixed_activation:
      return f"mixed(steps={self._steps(hp.activation_mixing_epochs)})"
    return "jsrelu"

  def model_options(self, level, num_train):
    hp = self.hparams
    options = {"layer_norm_mode": "fine_tuning",
               "uplift_steps": self._steps(hp.layernorm_uplifting_epochs)}
    if hp.db_mlp is None:
      options["db_mlp"] = True
    if hp.restricted_layer_norm is None:
      options["restricted_layer_norm"] = True
    if hp.restricted_layer_norm is False:
      del options["layer_norm_mode"], options["uplift_steps"]
    return options

  def transform_model(self, model, trial, level):
    rank = self.hparams.lora_rank
    if rank:
      for layer in model.layers:
        if layer.name.startswith("block") and hasattr(layer, "enable_lora") and (
            hasattr(layer, "units")):
          layer.enable_lora(rank)
    return model

  def start(self, level, history, fresh):
    source = f"--pretrained_run={self.hparams.pretrained_run}"
    extra = sorted(set(self._pretrained) - set(fresh))
    if extra:
      raise ValueError(f"{source} has variables the sparsified model lacks: "
                       f"{', '.join(extra[:3])} (a different architecture?)")
    missing = sorted(p for p in fresh if p not in self._pretrained and not _is_new(p))
    if missing:
      raise ValueError(f"{source} lacks {', '.join(missing[:3])} (a different architecture?)")
    for path, value in self._pretrained.items():
      if np.shape(value) != np.shape(fresh[path]):
        raise ValueError(f"{source}: {path} has shape {np.shape(value)}, the model "
                         f"{np.shape(fresh[path])} (other --vit_preset / sizes?)")
    return {**fresh, **self._pretrained}, 0
