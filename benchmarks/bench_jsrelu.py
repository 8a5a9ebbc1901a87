"""Benchmark: compiled J-SquaredReLU op vs the composite TensorFlow expression.

Times one forward plus backward pass (y = f(x) and dx = f'(x) * dy, both
materialised) over a large float32 tensor, for
  * the compiled op (`custom_ops.jsrelu`, implementation "custom_op"),
  * the composite expression (`custom_ops.jsrelu_reference`) in a tf.function,
  * the same composite compiled by XLA (`jit_compile=True`),
and prints the median over repeats (after warm-up, candidates interleaved) and the speed-up ratios.

  python -m benchmarks.bench_jsrelu [--elements 16777216] [--repeats 15]

Not a test: timings depend on the machine. Targets: >= 1.3x against the
composite and >= 1.0x against XLA.
"""

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from robust_sparse.custom_ops import CUSTOM_OP, jsrelu, jsrelu_reference


def _forward_backward(activation, jit_compile):
  """Returns a tf.function computing (f(x), f'(x) * dy)."""

  @tf.function(jit_compile=jit_compile, autograph=False)
  def step(x, upstream):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = activation(x)
    return y, tape.gradient(y, x, output_gradients=upstream)

  return step


def _median_seconds(candidates, x, upstream, warmup, repeats):
  """Median wall time of each candidate, measured round-robin.

  Interleaving the candidates spreads machine noise (other processes on a
  shared box) evenly over them instead of penalising whichever ran last.
  """
  for step in candidates.values():
    for _ in range(warmup):
      step(x, upstream)
  times = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, step in candidates.items():
      start = time.perf_counter()
      # On CPU the call returns once both outputs are computed.
      y, dx = step(x, upstream)
      times[name].append(time.perf_counter() - start)
      del y, dx
  return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_jsrelu",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--elements", type=int, default=1 << 24)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=21)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal(args.elements, dtype=np.float32))
  upstream = tf.constant(rng.standard_normal(args.elements, dtype=np.float32))

  candidates = {
      "custom op": _forward_backward(
          lambda t: jsrelu(t, implementation=CUSTOM_OP), jit_compile=False),
      "composite (tf.function)": _forward_backward(jsrelu_reference, False),
      "composite (XLA)": _forward_backward(jsrelu_reference, True),
  }
  # Same numbers first: a fast wrong kernel is no result.
  outputs = {name: step(x, upstream) for name, step in candidates.items()}
  for name, (y, dx) in outputs.items():
    np.testing.assert_allclose(y, outputs["custom op"][0], rtol=1e-6)
    np.testing.assert_allclose(dx, outputs["custom op"][1], rtol=1e-6)
  del outputs

  seconds = _median_seconds(candidates, x, upstream, args.warmup, args.repeats)
  print(f"J-SquaredReLU forward+backward, {args.elements} float32 elements, "
        f"median of {args.repeats} after {args.warmup} warm-up, "
        f"{tf.config.threading.get_intra_op_parallelism_threads() or 'all'} "
        "intra-op threads")
  for name, value in seconds.items():
    print(f"  {name:<24} {value * 1e3:8.2f} ms")
  base = seconds["custom op"]
  print(f"  speed-up vs composite:   {seconds['composite (tf.function)'] / base:5.2f}x"
        "  (target >= 1.3)")
  print(f"  speed-up vs XLA:         {seconds['composite (XLA)'] / base:5.2f}x"
        "  (target >= 1.0)")


if __name__ == "__main__":
  main()
