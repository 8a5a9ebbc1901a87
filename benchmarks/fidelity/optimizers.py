"""Fidelity of the plain optimizers: SGD, Adam, AdamW against torch.optim (and NumPy).

Two steps on random weights with random gradients, the learning rate
changed between them (0.1 then 0.05 for SGD; 1e-3 then 5e-4 for the Adams),
so a momentum buffer that held the rate (Keras' SGD) would show. Ours is
`robust_sparse.training.optimizers.make_optimizer` in float32; the references take
the same float32 start in float64. Adam's epsilon is Keras' placement
(`sqrt(v) + eps` before the bias correction, see `robust_sparse.training.optimizers`)
where torch adds it after: with eps 1e-7 that moves a step by about 1e-9.
"""

import numpy as np

from benchmarks.fidelity import Check

SHAPES = {"kernel": (4, 3), "bias": (5,)}

SGD_CONFIGS = {
    "sgd_momentum": dict(momentum=0.9, nesterov=False, weight_decay=5e-4),
    "sgd_nesterov": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_plain": dict(momentum=0.0, nesterov=False, weight_decay=0.0),
}
ADAM_CONFIGS = {
    "adam": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0),
    "adam_l2": dict(beta_1=0.8, beta_2=0.99, epsilon=1e-7, weight_decay=1e-2),
}
ADAMW_CONFIGS = {
    "adamw": dict(beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=5e-2),
}


def _problem(seed):
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in SHAPES.items():
    arrays["w:" + name] = rng.normal(size=shape).astype(np.float32)
    for step in range(2):
      arrays[f"g{step}:{name}"] = rng.normal(size=shape).astype(np.float32)
  return arrays


def _ours(kind, configs, rates):
  def run(context):
    import keras
    import tensorflow as tf

    from robust_sparse.training.optimizers import make_optimizer
    inputs = _problem(context.seed)
    inputs["lr"] = np.array(rates, np.float64)
    outputs = {}
    for config, options in configs.items():
      for key, value in options.items():
        inputs[f"{config}.{key}"] = np.array(value)
      variables = [keras.Variable(inputs["w:" + n], name=n) for n in SHAPES]
      optimizer = make_optimizer(kind, rates[0], **options)
      optimizer.build(variables)
      for step, rate in enumerate(rates):
        optimizer.learning_rate.assign(rate)
        optimizer.apply([tf.constant(inputs[f"g{step}:{n}"]) for n in SHAPES], variables)
      for n, v in zip(SHAPES, variables):
        outputs[f"{config}:{n}"] = np.asarray(v.numpy())
    return inputs, outputs
  return run


# ---- NumPy references: torch.optim's documented update rules ------------------------------
def _configs(inputs):
  names = sorted({k.split(".")[0] for k in inputs if "." in k})
  return {c: {k.split(".", 1)[1]: np.asarray(v).item() for k, v in inputs.items()
              if k.startswith(c + ".")} for c in names}


def _numpy_steps(inputs, update):
  outputs = {}
  for config, options in _configs(inputs).items():
    for name in SHAPES:
      w = inputs["w:" + name].astype(np.float64)
      state = {}
      for step, lr in enumerate(np.asarray(inputs["lr"])):
        w = update(w, inputs[f"g{step}:{name}"].astype(np.float64), float(lr), step + 1, state,
                   options)
      outputs[f"{config}:{name}"] = w
  return outputs


def _sgd_update(w, g, lr, t, state, o):
  """torch.optim.SGD, dampening 0."""
  g = g + o["weight_decay"] * w
  if o["momentum"]:
    state["buf"] = g if t == 1 else o["momentum"] * state["buf"] + g
    g = g + o["momentum"] * state["buf"] if o["nesterov"] else state["buf"]
  return w - lr * g


def _adam_update(w, g, lr, t, state, o, decoupled=False):
  """torch.optim.Adam (coupled L2) / AdamW (decoupled), eps after the bias correction."""
  if decoupled:
    w = w * (1 - lr * o["weight_decay"])
  else:
    g = g + o["weight_decay"] * w
  b1, b2 = o["beta_1"], o["beta_2"]
  state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
  state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
  m_hat = state["m"] / (1 - b1 ** t)
  v_hat = state["v"] / (1 - b2 ** t)
  return w - lr * m_hat / (np.sqrt(v_hat) + o["epsilon"])


def numpy_sgd(inputs):
  return _numpy_steps(inputs, _sgd_update)


def numpy_adam(inputs):
  return _numpy_steps(inputs, _adam_update)


def numpy_adamw(inputs):
  return _numpy_steps(inputs, lambda *a: _adam_update(*a, decoupled=True))


SGD_RATES = (0.1, 0.05)
ADAM_RATES = (1e-3, 5e-4)
_SGD_NAME = "SGD (momentum / Nesterov / coupled weight decay), two steps, lr 0.1 -> 0.05"
_ADAM_NAME = "Adam (plain, coupled L2 decay), two steps, lr 1e-3 -> 5e-4"
_ADAMW_NAME = "AdamW (decoupled decay 5e-2), two steps, lr 1e-3 -> 5e-4"

CHECKS = [
    Check(_SGD_NAME, "torch.optim.SGD", 1e-6, _ours("sgd", SGD_CONFIGS, SGD_RATES),
          peer="benchmarks.peers.fidelity_sam:sgd", needs=("torch",)),
    Check(_ADAM_NAME, "torch.optim.Adam (eps placement differs, ~1e-9)", 1e-6,
          _ours("adam", ADAM_CONFIGS, ADAM_RATES),
          peer="benchmarks.peers.fidelity_sam:adam", needs=("torch",)),
    Check(_ADAMW_NAME, "torch.optim.AdamW (eps placement differs, ~1e-9)", 1e-6,
          _ours("adamw", ADAMW_CONFIGS, ADAM_RATES),
          peer="benchmarks.peers.fidelity_sam:adamw", needs=("torch",)),
    Check(_SGD_NAME + " [NumPy]", "NumPy: torch.optim.SGD's update rule", 1e-6,
          _ours("sgd", SGD_CONFIGS, SGD_RATES), numpy_reference=numpy_sgd),
    Check(_ADAM_NAME + " [NumPy]", "NumPy: torch.optim.Adam's update rule", 1e-6,
          _ours("adam", ADAM_CONFIGS, ADAM_RATES), numpy_reference=numpy_adam),
    Check(_ADAMW_NAME + " [NumPy]", "NumPy: torch.optim.AdamW's update rule", 1e-6,
          _ours("adamw", ADAMW_CONFIGS, ADAM_RATES), numpy_reference=numpy_adamw),
]
