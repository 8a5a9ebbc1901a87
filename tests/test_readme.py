"""The README's commands work as written (after the install step, which CI runs)."""

import os
import re
import shlex
import subprocess
import sys

from tests.conftest import NOISE_RE, REPO, child_env, user_env


def _block_after(marker):
  text = open(os.path.join(REPO, "README.md")).read()
  match = re.search(re.escape(marker) + r"\s*```bash\n(.*?)```", text, re.S)
  assert match, f"README has no bash block after {marker}"
  return match.group(1).strip()


def test_test_command_is_what_ci_runs():
  text = open(os.path.join(REPO, "README.md")).read()
  command = "python -m pytest -q -n 2 --dist loadfile tests"
  assert command in text
  assert command in open(os.path.join(REPO, ".ci", "run")).read()


def test_quickstart_runs_as_written(tmp_path):
  """As a user runs it: a terminal's environment (no TF_CPP_MIN_LOG_LEVEL), the progress
  bar on; no CUDA, oneDNN or absl start-up line before the progress bar or anywhere."""
  command = _block_after("<!-- readme-test: quickstart -->")
  parts = [p.strip() for p in command.split("&&")]
  assert parts[0] == "pip install -r requirements.txt"
  env = user_env()
  for part in parts[1:]:
    argv = shlex.split(part)
    assert argv[0] == "python"
    result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not NOISE_RE.search(result.stderr), result.stderr[-3000:]
    # analysis.figures.save names any saved figure whose axis has no tick labels.
    assert "no tick labels" not in result.stderr, result.stderr[-2000:]
    if "run_experiments" in part:
      assert "trial 0 prune_iter 0" in result.stderr, result.stderr[-3000:]  # The bar.
  report = tmp_path / "output" / "analysis" / "report.md"
  assert report.exists()
  figures = list((tmp_path / "output" / "analysis").rglob("*.png"))
  assert figures, "the analysis drew no figures"


def test_fit_example_runs_as_written(tmp_path):
  text = open(os.path.join(REPO, "README.md")).read()
  match = re.search(r"<!-- readme-test: fit -->\s*```python\n(.*?)```", text, re.S)
  assert match, "README has no fit example"
  env = child_env()
  result = subprocess.run([sys.executable, "-c", match.group(1)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  natural, robust = map(float, result.stdout.strip().splitlines()[-1].split(":")[1].split())
  assert natural > 0.5 and 0.0 <= robust <= natural
  assert len((tmp_path / "log.csv").read_text().splitlines()) == 6


def test_relu_reduction_example_runs_as_written(tmp_path):
  script = _block_after("<!-- readme-test: relu -->")
  env = child_env()
  result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = (tmp_path / "relu" / "analysis" / "report.md").read_text()
  assert "ReLU reduction" in report
  assert list((tmp_path / "relu" / "analysis" / "figures").glob("*_relu.png"))
