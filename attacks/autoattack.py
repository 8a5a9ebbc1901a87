"""AutoAttack, standard version (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square in sequence.

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", the version RobustBench reports: each component
attacks only the examples that every earlier component left robust, and an
example counts as broken when any component breaks it (worst case per
example). The components, with the standard budgets: APGD-CE (100
iterations, one start), APGD-T (100 iterations for each of 9 target
classes), FAB-T (100 iterations for each of 9 target classes) and Square
(5000 queries, score-based, no gradients).

`COMPONENTS` is the one list of components; a component whose module is not
in this checkout (FAB-T in `attacks/fab.py`, Square in `attacks/square.py`)
is left out of the default sequence, and `available_components()` says
which ran. The whole sequence is graph code: the still-robust examples are
gathered (`tf.where`), attacked, and scattered back, inside one compiled
function; under XLA, which would pad the subset to the whole batch anyway,
every component runs on the whole batch and its results are kept where the
examples were still robust (`attacks.apgd.gathers_subsets`).
"""

import dataclasses
import importlib
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.apgd import check_first_window, gathers_subsets
from robust_sparse.attacks.common import (attack_labels, check_budget, check_norm,
                                          misclassified, per_example)


@dataclasses.dataclass(frozen=True)
class Component:
  """One attack of the sequence.

  Attributes:
    name: its name in `--eval_attacks` and the attack registry.
    module: the module that defines it, under `robust_sparse.attacks`.
    function: the attack's function there: `function(model, x, y, seed=..., **kwargs)`.
    kwargs: `kwargs(budget) -> dict`: its keyword arguments from AutoAttack's budget
      (eps, norm, clip_min, clip_max, steps, n_target_classes, n_queries, first_window).
  """
  name: str
  module: str
  function: str
  kwargs: Callable[[Dict], Dict]


def _box(b):
  return dict(eps=b["eps"], norm=b["norm"], clip_min=b["clip_min"], clip_max=b["clip_max"])


# The standard version's sequence, in order: the one place that lists it.
COMPONENTS: Tuple[Component, ...] = (
    Component("apgd_ce", "apgd", "apgd_ce",
              lambda b: dict(_box(b), steps=b["steps"], first_window=b["first_window"])),
    Component("apgd_t", "apgd", "apgd_t",
              lambda b: dict(_box(b), steps=b["steps"], n_target_classes=b["n_target_classes"],
                             first_window=b["first_window"])),
    Component("fab_t", "fab", "fab_t",
              lambda b: dict(_box(b), steps=b["steps"], n_target_classes=b["n_target_classes"])),
    Component("square", "square", "square", lambda b: dict(_box(b), n_queries=b["n_queries"])),
)
NAMES = tuple(c.name for c in COMPONENTS)


@tf.autograph.experimental.do_not_convert
def _function(component: Component):
  """The component's attack function, or None when its module is not in this checkout."""
  module_name = f"robust_sparse.attacks.{component.module}"
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name == module_name:
      return None
    raise
  return getattr(module, component.function, None)


def available_components() -> Tuple[str, ...]:
  """The standard components this checkout has, in the standard order."""
  return tuple(c.name for c in COMPONENTS if _function(c) is not None)


def check_components(components) -> Tuple[str, ...]:
  """`components` (None: every available one) as a tuple of names, checked.

  Raises:
    ValueError: an unknown or unavailable name, a name twice, or none at all.
  """
  if components is None:
    return available_components()
  if isinstance(components, str):
    components = (components,)
  components = tuple(components)
  if not components:
    raise ValueError("autoattack needs at least one component")
  for name in components:
    if name not in NAMES:
      raise ValueError(f"unknown AutoAttack component {name!r}; known: {', '.join(NAMES)}")
    if name not in available_components():
      raise ValueError(f"AutoAttack component {name!r} is not in this checkout; available: "
                       f"{', '.join(available_components())}")
  if len(set(components)) != len(components):
    raise ValueError(f"AutoAttack components named twice: {components}")
  order = {name: i for i, name in enumerate(NAMES)}
  return tuple(sorted(components, key=order.get))


def autoattack(model, x, y=None, *, eps, norm=np.inf, steps=100, n_target_classes=9,
               n_queries=5000, clip_min=0.0, clip_max=1.0, seed=None, components=None,
               first_window="paper"):
  """The standard AutoAttack: each component on the examples still robust; worst case per example.

  Graph code inside a `tf.function`; called eagerly it compiles itself once
  per model and arguments (`attacks.compiled`).

  Args:
    model: callable mapping a batch to logits, shape [batch, classes] (classes >= 4
      for APGD-T).
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    norm: np.inf (L-infinity) or 2 (L2).
    steps: APGD-CE's, APGD-T's and FAB-T's iterations (per target; standard 100).
    n_target_classes: APGD-T's and FAB-T's targets (standard 9).
    n_queries: Square's queries (standard 5000).
    clip_min: smallest valid input value.
    clip_max: largest valid input value.
    seed: None for stateful randomness, or a shape-[2] integer tensor; component
      c (0, 1, ... in the standard order) gets `stateless_fold_in(seed, c)`.
    components: names of `NAMES` to run (in the standard order whatever the
      order given); None runs every available component.
    first_window: APGD-CE's and APGD-T's first checkpoint window, "paper" or
      "fra31" (`attacks.apgd.search`).

  Returns:
    The adversarial batch: for each example broken, the point of the first
    component that broke it; the clean `x` for the others (as the reference).

  Raises:
    ValueError: a bad budget or norm, or a bad component list.
  """
  return autoattack_report(model, x, y, eps=eps, norm=norm, steps=steps,
                           n_target_classes=n_target_classes, n_queries=n_queries,
                           clip_min=clip_min, clip_max=clip_max, seed=seed,
                           components=components, first_window=first_window)[0]


def autoattack_report(model, x, y=None, *, eps, norm=np.inf, steps=100, n_target_classes=9,
                      n_queries=5000, clip_min=0.0, clip_max=1.0, seed=None, components=None,
                      first_window="paper"):
  """`autoattack`, and which component broke which example.

  Returns:
    (x_adv, broken): `broken` is bool [components, batch], row c true where
    component c (of `check_components(components)`, in order) broke an example
    that the earlier ones had left robust; the rows are disjoint, and an
    example is robust under the sequence iff its clean version is correct
    and no row is true.
  """
  check_budget(eps, clip_min, clip_max)
  for name, value, minimum in (("steps", steps, 0), ("n_target_classes", n_target_classes, 1),
                               ("n_queries", n_queries, 1)):
    if value < minimum or int(value) != value:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
  static = dict(eps=eps, norm=check_norm(norm), steps=int(steps),
                n_target_classes=int(n_target_classes), n_queries=int(n_queries),
                clip_min=clip_min, clip_max=clip_max, first_window=check_first_window(first_window),
                components=check_components(components))
  return compiled.run(_autoattack, model, x, y, seed, static, random=True)


def _autoattack(model, x, y, seed, *, components: Sequence[str], **budget):
  y = attack_labels(model, x, y)
  robust = ~misclassified(model(x, training=False), y)
  x_adv = x
  broken_rows = []
  by_name = {c.name: c for c in COMPONENTS}
  for name in components:
    component = by_name[name]
    attack = _function(component)
    kwargs = component.kwargs(budget)
    component_seed = (None if seed is None else
                      tf.random.experimental.stateless_fold_in(seed, NAMES.index(name)))

    def run(x_adv=x_adv, robust=robust, attack=attack, kwargs=kwargs,
            component_seed=component_seed):
      if not gathers_subsets():
        candidate = attack(model, x, y, seed=component_seed, **kwargs)
        broken = misclassified(model(candidate, training=False), y) & robust
        return (tf.where(per_example(broken, x), candidate, x_adv), robust & ~broken, broken)
      index = tf.where(robust)[:, 0]
      x_run, y_run = tf.gather(x, index), tf.gather(y, index)
      candidate = attack(model, x_run, y_run, seed=component_seed, **kwargs)
      broke = misclassified(model(candidate, training=False), y_run)
      rows = index[:, None]
      x_adv = tf.tensor_scatter_nd_update(
          x_adv, rows, tf.where(per_example(broke, x_run), candidate, tf.gather(x_adv, index)))
      broken = tf.scatter_nd(rows, tf.cast(broke, tf.int32), tf.shape(robust, out_type=tf.int64)) > 0
      return x_adv, robust & ~broken, broken

    def skip(x_adv=x_adv, robust=robust):
      return x_adv, robust, tf.zeros_like(robust)

    x_adv, robust, broken = tf.cond(tf.reduce_any(robust), run, skip)
    broken_rows.append(broken)
  return tf.stop_gradient(x_adv), tf.stack(broken_rows)
