"""The Square Attack (Andriushchenko et al. 2020), L-infinity or L2: score-based random search.

"Square Attack: a query-efficient black-box adversarial attack via random
search" (ECCV 2020). Black box: only the model's logits are queried, never
its gradients. Each query proposes a change of the current best point inside
one random square window and keeps it where it lowers the margin loss
logit_y - max_{j != y} logit_j; an example stops once the margin is <= 0
(misclassified). The side of the square follows the fraction p of the image's
pixels it covers: p_init, halved at queries 10, 50, 200, 500, 1000, 2000,
4000, 6000 and 8000 of a 10000-query run, the schedule rescaled to
`n_queries` (the paper's Algorithm 1 and the official code's `p_selection`).

The semantics are those of fra31/auto-attack's `SquareAttack` (square.py),
the version AutoAttack's standard evaluation runs, which torchattacks 3.5.1's
`Square` copies line for line:
- L-infinity starts from vertical stripes x + eps * (+-1 per column and
  channel); a query sets one s x s window of every channel to x_best +- 2 eps
  (one sign per channel), projected onto the eps-ball and [0, 1].
- L2 starts from a 5 x 5 grid of the paper's "eta" blocks (rings of weight
  1/(k+1)^2, positive on one half and negative on the other, random
  orientation and sign per block and channel) scaled to norm eps; a query
  moves the perturbation's mass from a second window into the first, with a
  new eta block (random orientation and per-channel sign), and rescales to
  norm eps.
- The window's position, orientation and (for L-infinity) its signs are
  drawn once per query for the whole batch, as fra31's version does (the
  paper's original code draws them per image; each image sees the same
  distribution either way). L2's signs are drawn per image.
- Positions are uniform in [0, size - s - 1], as the reference's
  `random_int(0, h - s)` (the last row and column can start no window).
- The margin loss only (the standard's; the reference's "ce" option is not
  offered), untargeted.
Differences: the whole batch is queried each iteration with masks (fixed
shapes, so the loop compiles with XLA; the reference queries only the
examples not yet fooled, which gives each example the same sequence of
proposals and decisions); the draws are stateless, from `seed`.
"""

import math

import numpy as np
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.common import attack_labels, check_budget, stateless_uniform
from robust_sparse.attacks.fab import lp_norm, unit_box

# The reference's guard against dividing by a zero norm.
_TINY = 1e-12


def square(model, x, y=None, *, eps, norm=np.inf, n_queries=5000, p_init=0.8, n_restarts=1,
           clip_min=0.0, clip_max=1.0, seed=None):
  """Square Attack: `n_queries` random-search queries of the model's logits per example.

  Graph code inside a `tf.function`; called eagerly it compiles itself once
  per model and arguments (`attacks.compiled`). The loop stops early once
  every example is misclassified.

  Args:
    model: callable mapping a batch of images to logits, shape [batch, classes].
    x: float batch of images, [batch, height, width, channels] (or
      [batch, height, width]); L2 needs height and width >= 5.
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    norm: np.inf (or "inf", "linf", "Linf": L-infinity) or 2 (or "l2", "L2").
    n_queries: queries per example and restart (>= 0; the standard's 5000).
    p_init: the initial fraction of pixels a square covers, in (0, 1].
    n_restarts: independent runs (>= 1), each on the examples not fooled yet.
    clip_min: smallest valid input value.
    clip_max: largest valid input value (other ranges than [0, 1] are mapped
      to it, eps scaled with them, and back).
    seed: None for stateful randomness, or a shape-[2] integer tensor for
      stateless (reproducible) draws (`square_draws` lists them).

  Returns:
    The adversarial batch, same shape and dtype as `x`: the misclassified
    point found where the attack succeeded, the clean image elsewhere (and
    where the clean image is misclassified already), as the reference returns.

  Raises:
    ValueError: a negative budget or query count, a bad norm, p_init outside
      (0, 1], n_restarts < 1, or an input that is not a batch of images.
  """
  _check(x, eps, norm, n_queries, p_init, n_restarts, clip_min, clip_max)
  norm = lp_norm(norm)
  static = dict(eps=eps, norm=norm, n_queries=int(n_queries), p_init=float(p_init),
                n_restarts=int(n_restarts), clip_min=clip_min, clip_max=clip_max)
  return compiled.run(_square, model, x, y, seed, static, random=True)


def _check(x, eps, norm, n_queries, p_init, n_restarts, clip_min, clip_max):
  check_budget(eps, clip_min, clip_max)
  if n_queries < 0 or int(n_queries) != n_queries:
    raise ValueError(f"n_queries must be an integer >= 0, got {n_queries}")
  if not 0.0 < p_init <= 1.0:
    raise ValueError(f"p_init must be in (0, 1], got {p_init}")
  if n_restarts < 1 or int(n_restarts) != n_restarts:
    raise ValueError(f"n_restarts must be an integer >= 1, got {n_restarts}")
  norm = lp_norm(norm)
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) not in (3, 4):
    raise ValueError(f"square needs images [batch, height, width(, channels)], got shape "
                     f"{None if shape is None else tuple(shape)}")
  if norm == 2 and min(shape[1], shape[2]) < 5:
    raise ValueError(f"square L2 needs images of at least 5 x 5 pixels, got "
                     f"{tuple(shape[1:3])}")


def p_schedule(iteration, n_queries, p_init):
  """The official `p_selection`: p_init halved at fixed points of a rescaled 10000 queries."""
  it = int(iteration / n_queries * 10000)
  for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32),
                         (500, 16), (200, 8), (50, 4), (10, 2)):
    if it > bound:
      return p_init / divisor
  return p_init


def square_sizes(n_queries, p_init, height, width, norm):
  """The side s of the square at each query (Python ints), as the reference computes it.

  s = round(sqrt(p * height * width)), at least 1 (L-infinity), or at least
  3 and odd (L2); at most min(height, width) (the reference leaves larger
  squares undefined).
  """
  sizes = []
  for i in range(n_queries):
    s = int(round(math.sqrt(p_schedule(i, n_queries, p_init) * height * width)))
    if norm == np.inf:
      s = max(s, 1)
    else:
      s = max(s, 3)
      s += 1 - s % 2
    sizes.append(min(s, height, width))
  return sizes


def _init_windows(height, width):
  """L2's initial grid: (block side, first offset, blocks per column, blocks per row)."""
  side = height // 5
  return side, (height - side * 5) // 2, height // side, width // side


def square_draws(seed, iteration, batch, channels, height, width, size, norm):
  """The random choices of one query (graph code), from `stateless_fold_in(seed, iteration)`.

  Returns a dict: "rows", "cols" (the window's top-left corner, int32
  scalars uniform in [0, height - size - 1] and [0, width - size - 1]),
  "rows_2", "cols_2" (L2's second window), "transpose" (bool scalar: L2's eta
  block is transposed) and "signs": +-1 per channel [channels] (L-infinity)
  or per image and channel [batch, channels] (L2).
  """
  query_seed = tf.random.experimental.stateless_fold_in(seed, iteration)
  u = tf.random.stateless_uniform([5], seed=query_seed, alg="philox")
  spans = tf.cast(tf.stack([height - size, width - size] * 2), tf.float32)
  corners = tf.cast(tf.floor(u[:4] * spans), tf.int32)
  sign_seed = tf.random.experimental.stateless_fold_in(query_seed, 1)
  if norm == np.inf:
    signs = tf.sign(2.0 * tf.random.stateless_uniform([channels], seed=sign_seed,
                                                      alg="philox") - 1.0)
  else:
    signs = tf.sign(2.0 * stateless_uniform([batch, channels], sign_seed, 0.0, 1.0,
                                            tf.float32) - 1.0)
  return dict(rows=corners[0], cols=corners[1], rows_2=corners[2], cols_2=corners[3],
              transpose=u[4] > 0.5, signs=signs)


def square_initial_draws(seed, batch, channels, height, width, norm):
  """The random choices of the starting point (graph code), from `stateless_fold_in(seed, -1)`.

  Returns a dict: "signs", +-1 [batch, 1, width, channels] (L-infinity's
  stripes) or [batch, blocks per column, blocks per row, channels] (L2's
  blocks), and for L2 "transpose", bool [blocks per column, blocks per row].
  """
  start_seed = tf.random.experimental.stateless_fold_in(seed, -1)
  if norm == np.inf:
    return dict(signs=tf.sign(2.0 * stateless_uniform([batch, 1, width, channels], start_seed,
                                                      0.0, 1.0, tf.float32) - 1.0))
  _, _, blocks_h, blocks_w = _init_windows(height, width)
  u = tf.random.stateless_uniform([blocks_h, blocks_w], seed=start_seed, alg="philox")
  sign_seed = tf.random.experimental.stateless_fold_in(start_seed, 1)
  signs = stateless_uniform([batch, blocks_h, blocks_w, channels], sign_seed, 0.0, 1.0,
                            tf.float32)
  return dict(signs=tf.sign(2.0 * signs - 1.0), transpose=u > 0.5)


def _margin(logits, y):
  """logit_y - max_{j != y} logit_j per example (the margin loss, <= 0: misclassified)."""
  correct = tf.gather(logits, y[:, None], axis=1, batch_dims=1)[:, 0]
  is_label = tf.one_hot(y, tf.shape(logits)[-1], on_value=True, off_value=False)
  other = tf.reduce_max(tf.where(is_label, tf.constant(-np.inf, logits.dtype), logits), axis=-1)
  return correct - other


def _norm(v):
  """Per-example L2 norm of images [batch, height, width, channels], shaped to broadcast."""
  return tf.sqrt(tf.reduce_sum(tf.square(v), axis=[1, 2, 3], keepdims=True))


def _ring_sums(largest):
  """T[m, K] = sum_{k=m}^{K-1} 1/(k+1)^2 in float32, added in the reference's order.

  The reference's `eta_rectangles` adds 1/(k+1)^2 for k = 0, 1, ... to the
  cells within Chebyshev distance k of the centre, so a cell at distance m
  holds the float32 sum of the terms k = m .. K-1, added in that order.
  """
  table = np.zeros((largest + 1, largest + 1), np.float32)
  for m in range(largest + 1):
    total = np.float32(0.0)
    for k in range(m, largest + 1):
      table[m, k] = total  # The terms m .. k - 1.
      total = np.float32(total + np.float32(1.0) / np.float32((k + 1) ** 2))
  return table


def _eta_rectangle(i, j, extent_i, extent_j, largest):
  """The reference's unnormalised `eta_rectangles(extent_i, extent_j)` at cells (i, j).

  Rings around the centre (extent // 2): a cell at Chebyshev distance m gets
  sum_{k=m}^{K-1} 1/(k+1)^2, K = max(extent_i, extent_j) // 2 + 1 (`_ring_sums`,
  which `largest` bounds, a Python int).
  """
  distance = tf.maximum(tf.abs(i - extent_i // 2), tf.abs(j - extent_j // 2))
  rings = tf.maximum(extent_i // 2 + 1, extent_j // 2 + 1)
  table = tf.constant(_ring_sums(largest))
  index = tf.stack([tf.clip_by_value(distance, 0, largest),
                    tf.clip_by_value(rings + 0 * distance, 0, largest)], axis=-1)
  return tf.where(distance < rings, tf.gather_nd(table, index), 0.0)


def _eta(i, j, size, transpose, largest):
  """The reference's `eta(size)` at local cells (i, j) (zero outside [0, size)^2).

  The top half (rows < size // 2) is a normalised eta rectangle, the bottom
  half minus one, the whole normalised again; `transpose` (bool, broadcast
  against i) swaps rows and columns. The normalisations sum over the cells
  given, so (i, j) must cover the block once (each block of a grid separately:
  `block` labels them, see `_eta_blocks`).
  """
  i, j = tf.where(transpose, j, i), tf.where(transpose, i, j)
  inside = (i >= 0) & (i < size) & (j >= 0) & (j < size)
  half = size // 2
  top = i < half
  value = _eta_rectangle(tf.where(top, i, i - half), j, tf.where(top, half, size - half), size,
                         largest)
  value = tf.where(inside, value, 0.0)
  return value, inside, top


def _normalised_eta(i, j, size, transpose, largest, axes):
  """`_eta` normalised as the reference does, summing squares over `axes` (one block)."""
  value, inside, top = _eta(i, j, size, transpose, largest)
  square = tf.square(value)
  top_norm = tf.sqrt(tf.reduce_sum(tf.where(inside & top, square, 0.0), axis=axes,
                                   keepdims=True))
  bottom_norm = tf.sqrt(tf.reduce_sum(tf.where(inside & ~top, square, 0.0), axis=axes,
                                      keepdims=True))
  value = tf.where(inside & top, value / tf.where(top_norm > 0, top_norm, 1.0),
                   tf.where(inside, -value / tf.where(bottom_norm > 0, bottom_norm, 1.0), 0.0))
  total = tf.sqrt(tf.reduce_sum(tf.square(value), axis=axes, keepdims=True))
  return value / tf.where(total > 0, total, 1.0)


def _window(rows, cols, size, height, width):
  """1 inside the size x size window at (rows, cols), else 0: [1, height, width, 1]."""
  r = tf.range(height)[:, None]
  c = tf.range(width)[None, :]
  inside = (r >= rows) & (r < rows + size) & (c >= cols) & (c < cols + size)
  return tf.cast(inside, tf.float32)[None, :, :, None]


def square_margins(model, x, y=None, *, eps, norm=np.inf, n_queries=5000, p_init=0.8,
                   clip_min=0.0, clip_max=1.0, seed=None):
  """The best margin loss of one Square run after each query: its query-efficiency curve.

  The run `square(..., n_restarts=1)` makes with the same arguments (the same
  draws for the same seed and compile mode).

  Returns:
    float32 [n_queries + 1, batch]: row 0 the margin at the start, row i after
    i queries (non-increasing per example; once every example is fooled the
    loop stops and later rows repeat the last). Examples misclassified when
    clean are not attacked and keep the start's margin.

  Raises:
    ValueError: as `square`.
  """
  _check(x, eps, norm, n_queries, p_init, 1, clip_min, clip_max)
  static = dict(eps=eps, norm=lp_norm(norm), n_queries=int(n_queries),
                p_init=float(p_init), n_restarts=1, clip_min=clip_min, clip_max=clip_max,
                record=True)
  return compiled.run(_square, model, x, y, seed, static, random=True)


def _square(model, x, y, seed, *, eps, norm, n_queries, p_init, n_restarts, clip_min, clip_max,
            record=False):
  dtype = x.dtype
  model_shape = tf.shape(x)
  y = tf.cast(attack_labels(model, x, y), tf.int32)
  if x.shape.rank == 3:
    inner = model

    def model(images, training=False):
      return inner(tf.reshape(images, model_shape), training=training)

    x = x[..., None]
  model, x, eps, back = unit_box(model, tf.cast(x, tf.float32), eps, clip_min, clip_max)
  if seed is None:
    seed = tf.random.uniform([2], maxval=np.iinfo(np.int32).max, dtype=tf.int32)

  def margin(images):
    return _margin(tf.cast(model(images, training=False), tf.float32), y)

  def misclassified(images):
    predicted = tf.argmax(tf.cast(model(images, training=False), tf.float32), axis=-1,
                          output_type=tf.int32)
    return tf.not_equal(predicted, y)

  run = _run_linf if norm == np.inf else _run_l2
  robust = ~misclassified(x)
  if record:
    return run(margin, x, robust, seed, eps=tf.cast(eps, tf.float32), n_queries=n_queries,
               p_init=p_init, record=True)[1]

  def restart(r, x_adv, robust):
    run_seed = seed if n_restarts == 1 else tf.random.experimental.stateless_fold_in(seed, r)
    x_best = run(margin, x, robust, run_seed, eps=tf.cast(eps, tf.float32),
                 n_queries=n_queries, p_init=p_init)
    fooled = robust & misclassified(x_best)
    return r + 1, tf.where(fooled[:, None, None, None], x_best, x_adv), robust & ~fooled

  _, x_adv, _ = tf.while_loop(lambda r, _, robust: (r < n_restarts) & tf.reduce_any(robust),
                              restart, (tf.constant(0), x, robust))
  return tf.stop_gradient(tf.cast(tf.reshape(back(x_adv), model_shape), dtype))


def _search(margin, x, x_best, active, propose, n_queries, record=False):
  """The query loop shared by both norms: keep a proposal where it lowers the margin.

  `active` [batch]: the examples attacked (the others keep x_best and never
  count); `propose(i, x_best) -> x_new`. Returns the final x_best, and with
  `record` also the best margin after each query, [n_queries + 1, batch] (row
  0: the start; rows after an early stop repeat the last).
  """
  margin_best = margin(x_best)
  active = active & (margin_best > 0)
  history = tf.zeros([n_queries + 1 if record else 1, tf.shape(x)[0]], tf.float32)
  history = tf.tensor_scatter_nd_update(history, [[0]], margin_best[None])

  def query(i, x_best, margin_best, active, history):
    x_new = propose(i, x_best)
    new_margin = margin(x_new)
    improved = active & (new_margin < margin_best)
    margin_best = tf.where(improved, new_margin, margin_best)
    x_best = tf.where(improved[:, None, None, None], x_new, x_best)
    if record:
      history = tf.tensor_scatter_nd_update(history, [[i + 1]], margin_best[None])
    return i + 1, x_best, margin_best, active & (margin_best > 0), history

  queries, x_best, margin_best, _, history = tf.while_loop(
      lambda i, _, __, active, ___: (i < n_queries) & tf.reduce_any(active), query,
      (tf.constant(0), x_best, margin_best, active, history))
  if not record:
    return x_best
  after = tf.range(n_queries + 1)[:, None] > queries
  return x_best, tf.where(after, margin_best[None], history)


def _run_linf(margin, x, active, seed, *, eps, n_queries, p_init, record=False):
  """One L-infinity run (the reference's `attack_single_run`): the final x_best."""
  batch, height, width, channels = (tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3])
  sizes = tf.constant(square_sizes(n_queries, p_init, height, width, np.inf) or [1], tf.int32)
  lower = tf.maximum(x - eps, 0.0)
  upper = tf.minimum(x + eps, 1.0)
  start = square_initial_draws(seed, batch, channels, height, width, np.inf)
  x_best = tf.clip_by_value(x + eps * start["signs"], 0.0, 1.0)

  def propose(i, x_best):
    size = sizes[i]
    draws = square_draws(seed, i, batch, channels, height, width, size, np.inf)
    window = _window(draws["rows"], draws["cols"], size, height, width)
    x_new = x_best + window * (2.0 * eps * draws["signs"])
    return tf.clip_by_value(x_new, lower, upper)

  return _search(margin, x, x_best, active, propose, n_queries, record)


def _run_l2(margin, x, active, seed, *, eps, n_queries, p_init, record=False):
  """One L2 run (the reference's `attack_single_run`): the final x_best."""
  batch, height, width, channels = (tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3])
  sizes = tf.constant(square_sizes(n_queries, p_init, height, width, 2) or [3], tf.int32)
  largest = max(height, width) // 2 + 2
  r = tf.range(height)[:, None]
  c = tf.range(width)[None, :]

  # The start: a grid of eta blocks, each with its orientation and per-channel signs.
  side, offset, blocks_h, blocks_w = _init_windows(height, width)
  start = square_initial_draws(seed, batch, channels, height, width, 2)
  block_r = tf.where(r >= offset, (r - offset) // side, -1) + 0 * c
  block_c = tf.where(c >= offset, (c - offset) // side, -1) + 0 * r
  in_grid = (block_r >= 0) & (block_r < blocks_h) & (block_c >= 0) & (block_c < blocks_w)
  block_r = tf.clip_by_value(block_r, 0, blocks_h - 1)
  block_c = tf.clip_by_value(block_c, 0, blocks_w - 1)
  local_r = r - offset - block_r * side
  local_c = c - offset - block_c * side
  transpose = tf.gather_nd(start["transpose"], tf.stack([block_r, block_c], axis=-1))
  # One block's normalisation sums over that block only: normalise a single block
  # (both orientations) and look the grid's cells up in it.
  block = tf.range(side)
  eta_plain = _normalised_eta(block[:, None] + 0 * block[None, :],
                              block[None, :] + 0 * block[:, None], side, False, largest,
                              axes=[0, 1])
  eta_transposed = tf.transpose(eta_plain)
  cell = tf.stack([tf.clip_by_value(local_r, 0, side - 1),
                   tf.clip_by_value(local_c, 0, side - 1)], axis=-1)
  eta_grid = tf.where(transpose, tf.gather_nd(eta_transposed, cell),
                      tf.gather_nd(eta_plain, cell))
  eta_grid = tf.where(in_grid, eta_grid, 0.0)
  signs = tf.gather_nd(tf.transpose(start["signs"], [1, 2, 0, 3]),
                       tf.stack([block_r, block_c], axis=-1))      # [height, width, batch, ch]
  delta = eta_grid[None, :, :, None] * tf.transpose(signs, [2, 0, 1, 3])
  delta = tf.where(in_grid[None, :, :, None], delta, 0.0)
  x_best = tf.clip_by_value(x + delta / (_norm(delta) + _TINY) * eps, 0.0, 1.0)

  def propose(i, x_best):
    size = sizes[i]
    draws = square_draws(seed, i, batch, channels, height, width, size, 2)
    delta = x_best - x
    window = _window(draws["rows"], draws["cols"], size, height, width)
    window_2 = _window(draws["rows_2"], draws["cols_2"], size, height, width)
    window_norm = tf.sqrt(tf.reduce_sum(tf.square(delta * window), axis=[1, 2], keepdims=True))
    image_norm = _norm(delta)
    windows_norm = _norm(delta * tf.maximum(window, window_2))
    eta = _normalised_eta(r - draws["rows"] + 0 * c, c - draws["cols"] + 0 * r, size,
                          draws["transpose"], largest, axes=[0, 1])
    new = eta[None, :, :, None] * draws["signs"][:, None, None, :]
    new += delta * window / (_TINY + window_norm)
    new_norm = tf.sqrt(tf.reduce_sum(tf.square(new), axis=[1, 2], keepdims=True))
    budget = tf.maximum(tf.square(eps) - tf.square(image_norm), 0.0) / channels
    new = new / (_TINY + new_norm) * tf.sqrt(budget + tf.square(windows_norm))
    delta = delta * (1.0 - window_2) * (1.0 - window) + new * window
    return tf.clip_by_value(x + delta / (_norm(delta) + _TINY) * eps, 0.0, 1.0)

  return _search(margin, x, x_best, active, propose, n_queries, record)
