"""PyTorch peers of the toolkit's jobs, for `benchmarks.bench_jobs` (never imported by it).

Each peer is a script a PyTorch user would write for the same work; they import
torch (and torchattacks), never TensorFlow, so their start-up is theirs alone.
"""
