"""Fidelity of AutoReP (`relu_prune`): the masked ReLU and the two-phase mask step.

Against a PyTorch re-derivation of harveyp123/AutoReP's modules and training
loop (`benchmarks/peers/fidelity_autorep.py`), on random inputs, random mask
logits (about half the gates closed) and random upstream gradients:

- every replacement with both forwards ("intended", the fixed e066c1f form;
  "released", e37c8bb's in-place relu, where that commit has the module):
  the output, dL/dx, dL/dalpha (the softplus straight-through estimator) and
  the trainable polynomials' gradients;
- the hysteresis ("relay") gate with a random state mask near the thresholds;
- mask dropout at p = 1 in a training call for every replacement (AutoReP's
  spgrad, poly and autopoly modules then compute relu, the others ignore it);
- two steps of the mask phase (`ReLUPrune.optimizer_groups` in the engine: Adam
  on alpha for CE + lamda relu(density - target), then a second forward and
  SGD on the weights), at epochs 2 and 3 of 5 of the cosine schedules, on
  Dense -> BatchNorm -> masked relu -> Dense (the zoo's `TorchBatchNorm`).
  Compared: every weight, alpha, the state mask and the batch-norm running
  mean and variance.
"""

import numpy as np

from benchmarks.fidelity import Check

SHAPE = (4, 3, 3, 5)  # NHWC: 4 images of 3 x 3 x 5 activations.
REFERENCE = "PyTorch re-derivation of AutoReP's module (STEFunction, ReLU_Pruned)"
RELEASED = ("identity", "identity_relu_grad", "poly", "autopoly1", "autopoly2")


def _site(replacement):
  return "after_bn" if replacement.startswith("autopoly") else None


def _masked_relu(context, replacement, relu_forward="intended", *, threshold=0.0,
                 site=None, mask_dropout=0.0, salt=0):
  import tensorflow as tf
  from robust_sparse.nn.relu_masks import MaskedReLU

  rng = np.random.default_rng([context.seed, salt])
  x = rng.normal(0.0, 1.5, SHAPE).astype(np.float32)
  alpha = rng.normal(0.0, 0.5, SHAPE[1:]).astype(np.float32)
  state = (rng.random(SHAPE[1:]) < 0.5).astype(np.float32)
  upstream = rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
  site = site or _site(replacement)
  layer = MaskedReLU(replacement, relu_forward=relu_forward, scale_x2=0.1, scale_x=0.5,
                     hysteresis_threshold=threshold, mask_dropout=mask_dropout, site=site)
  layer.build((None,) + SHAPE[1:])
  layer.alpha.assign(alpha)
  layer.hysteresis_mask.assign(state)
  inputs = dict(x=x, alpha=alpha, state=state, upstream=upstream,
                replacement=np.array(replacement), relu_forward=np.array(relu_forward),
                site=np.array(site or ""), threshold=np.array(threshold),
                scale_x2=np.array(0.1), scale_x=np.array(0.5), training=np.array(True),
                mask_dropout=np.array(mask_dropout))
  poly = [w for w in layer.trainable_weights if "poly_w" in w.path]
  for w in poly:
    value = rng.normal(0.0, 0.5, w.shape).astype(np.float32)
    w.assign(value)
    inputs[w.path.split("/")[-1]] = value
  x_tensor = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tensor)
    y = layer(x_tensor, training=True)
    loss = tf.reduce_sum(upstream * y)
  grads = tape.gradient(loss, [x_tensor, layer.alpha] + poly)
  outputs = {"y": y.numpy(), "d_x": grads[0].numpy(), "d_alpha": grads[1].numpy(),
             "state": layer.hysteresis_mask.numpy()}
  for w, g in zip(poly, grads[2:]):
    outputs["d_" + w.path.split("/")[-1]] = g.numpy()
  return inputs, outputs


def _dropout_everywhere(context):
  """Mask dropout p = 1 in a training call, for every replacement at once."""
  from robust_sparse.nn.relu_masks import REPLACEMENTS
  inputs, outputs = {}, {}
  for i, name in enumerate(sorted(REPLACEMENTS.names())):
    one_in, one_out = _masked_relu(context, name, mask_dropout=1.0, salt=100 + i)
    inputs.update({f"{name}/{k}": v for k, v in one_in.items()})
    outputs.update({f"{name}/{k}": v for k, v in one_out.items() if k in ("y", "d_x")})
  return inputs, outputs


def _two_phase(context, replacement="identity_relu_grad", relu_forward="intended",
               threshold=0.0):
  import keras
  from robust_sparse.experiments.registry import Defaults
  from robust_sparse.experiments.relu_reduction import ReLUPrune
  from robust_sparse.training.engine import Engine
  from robust_sparse.core.hparams import Hparams
  from robust_sparse.nn.relu_masks import MaskedReLU
  from robust_sparse.models.registry import TorchBatchNorm
  from robust_sparse.training.steps import standard_loss_grad_fn

  rng = np.random.default_rng([context.seed, 7])
  n, features, hidden, classes = 16, 6, 10, 3
  x = rng.normal(0.0, 1.0, (n, features)).astype(np.float32)
  y = rng.integers(0, classes, n).astype(np.int32)
  inputs_layer = keras.Input((features,))
  h = keras.layers.Dense(hidden, name="hidden")(inputs_layer)
  h = TorchBatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(h)
  site = MaskedReLU(replacement, relu_forward=relu_forward, hysteresis_threshold=threshold,
                    site="after_bn", name="site")
  logits = keras.layers.Dense(classes, name="output")(site(h))
  model = keras.Model(inputs_layer, logits)
  values = {
      "hidden_kernel": rng.normal(0, 0.5, (features, hidden)),
      "hidden_bias": rng.normal(0, 0.1, hidden), "gamma": rng.uniform(0.5, 1.5, hidden),
      "beta": rng.normal(0, 0.1, hidden), "moving_mean": rng.normal(0, 0.1, hidden),
      "moving_variance": rng.uniform(0.5, 1.5, hidden),
      "output_kernel": rng.normal(0, 0.5, (hidden, classes)),
      "output_bias": rng.normal(0, 0.1, classes),
      "alpha": rng.normal(0.0, 0.05, hidden), "state": (rng.random(hidden) < 0.5) * 1.0}
  values = {k: np.asarray(v, np.float32) for k, v in values.items()}
  variables = {"hidden_kernel": model.get_layer("hidden").kernel,
               "hidden_bias": model.get_layer("hidden").bias,
               "gamma": model.get_layer("bn").gamma, "beta": model.get_layer("bn").beta,
               "moving_mean": model.get_layer("bn").moving_mean,
               "moving_variance": model.get_layer("bn").moving_variance,
               "output_kernel": model.get_layer("output").kernel,
               "output_bias": model.get_layer("output").bias,
               "alpha": site.alpha, "state": site.hysteresis_mask}
  for name, variable in variables.items():
    variable.assign(values[name])
  hp = Hparams(dataset="sklearn_digits", model="dense-300-100", experiment="relu_prune",
               relu_sparsity=0.6, mask_epochs=5.0, batch_size=n, alpha_lr=0.05,
               alpha_weight_decay=1e-3, w_mask_lr=0.1, w_mask_weight_decay=5e-4,
               momentum=0.9, eta_min=1e-5, lamda=10.0, relu_replacement=replacement,
               relu_forward=relu_forward, hysteresis_threshold=threshold)
  experiment = ReLUPrune(hp)
  experiment.target = 0.4
  defaults = Defaults(groups=None,
                      loss_grad_fn=lambda distill=True: standard_loss_grad_fn(
                          model, num_classes=classes))
  engine = Engine(model, experiment.loss_grad_fn(0, model, defaults),
                  experiment.optimizer_groups(0, model, n, defaults), x_train=x, y_train=y,
                  batch_size=n, attack=None, compile="graph")
  engine.reset(0, iteration=2)  # One batch per epoch: steps at epochs 2 and 3 of 5.
  engine.train(engine.batches(seed=1, start_iteration=2), 2)
  inputs = dict(values, x=x, y=y, replacement=np.array(replacement),
                relu_forward=np.array(relu_forward), threshold=np.array(threshold),
                scale_x2=np.array(hp.scale_x2), scale_x=np.array(hp.scale_x),
                w_mask_lr=np.array(hp.w_mask_lr), momentum=np.array(hp.momentum),
                w_mask_weight_decay=np.array(hp.w_mask_weight_decay),
                alpha_lr=np.array(hp.alpha_lr),
                alpha_weight_decay=np.array(hp.alpha_weight_decay),
                mask_epochs=np.array(hp.mask_epochs), eta_min=np.array(hp.eta_min),
                target=np.array(experiment.target), lamda=np.array(hp.lamda),
                epochs=np.array([2, 3]))
  outputs = {name: v.numpy() for name, v in variables.items()}
  return inputs, outputs


def _relu_check(replacement, relu_forward, **kwargs):
  label = f"AutoReP masked ReLU: {replacement}, {relu_forward} forward"
  if kwargs.get("site"):
    label += f", {kwargs['site']}"
  if kwargs.get("threshold"):
    label += f", hysteresis t={kwargs['threshold']}"
  return Check(name=label, reference=REFERENCE, tolerance=1e-5,
               ours=lambda context: _masked_relu(context, replacement, relu_forward, **kwargs),
               peer="benchmarks.peers.fidelity_autorep:masked_relu", needs=("torch",))


CHECKS = (
    [_relu_check(name, forward) for name in ("identity", "identity_relu_grad", "poly",
                                             "autopoly1", "trainable_poly", "trainable_poly1")
     for forward in (("intended", "released") if name in RELEASED else ("intended",))]
    + [_relu_check("autopoly2", forward, site=site) for site in ("after_bn", "after_residual")
       for forward in ("intended", "released")]
    + [_relu_check("identity_relu_grad", "intended", threshold=0.3),
       _relu_check("poly", "released", threshold=0.3)]
    + [Check(name="AutoReP mask dropout p=1: relu for spgrad/poly/autopoly only",
             reference="PyTorch re-derivation of AutoReP's modules (mask dropout)",
             tolerance=1e-5, ours=_dropout_everywhere,
             peer="benchmarks.peers.fidelity_autorep:dropout_everywhere", needs=("torch",)),
       Check(name="AutoReP two-phase mask step (Adam on alpha, then SGD), spgrad",
             reference="PyTorch re-derivation of AutoReP's train_mask, 2 steps",
             tolerance=1e-5, ours=_two_phase,
             peer="benchmarks.peers.fidelity_autorep:two_phase_step", needs=("torch",)),
       Check(name="AutoReP two-phase mask step, poly released, hysteresis t=0.02",
             reference="PyTorch re-derivation of AutoReP's train_mask, 2 steps",
             tolerance=1e-5,
             ours=lambda context: _two_phase(context, "poly", "released", 0.02),
             peer="benchmarks.peers.fidelity_autorep:two_phase_step", needs=("torch",))])
