"""The former name of `benchmarks.bench_autoattack` (same flags, same output).

  python -m benchmarks.check_autoattack --data_dir=../shared/data
"""

from absl import app

from benchmarks import bench_autoattack

if __name__ == "__main__":
  bench_autoattack.define_flags()
  app.run(bench_autoattack.main)
