"""Work sharing: processes on the same command and base folder never train a level twice."""

import glob
import json
import os
import subprocess
import sys
import time

from robust_sparse.core import claims
from tests.conftest import REPO, child_env


def test_a_live_claim_is_respected_and_a_dead_or_silent_one_taken_over(tmp_path):
  directory = str(tmp_path / "level")
  first = claims.try_claim(directory)
  assert first is not None
  assert claims.try_claim(directory) is None  # Ours, alive, fresh: held.
  info = claims.read_claim(directory)
  assert info["pid"] == os.getpid() and info["heartbeat_age"] < 5
  with first:
    pass
  assert not os.path.exists(os.path.join(directory, claims.CLAIM_FILE))  # Released.
  # A claim of a process that is gone is stale at once ...
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  with open(os.path.join(directory, claims.CLAIM_FILE), "w") as f:
    json.dump({"host": claims.socket.gethostname(), "pid": int(dead.stdout),
               "token": "old"}, f)
  taken = claims.try_claim(directory)
  assert taken is not None and claims.read_claim(directory)["token"] == taken.token
  taken.release()
  # ... and one of another host once its heartbeat is older than the limit.
  with open(os.path.join(directory, claims.CLAIM_FILE), "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "token": "remote"}, f)
  assert claims.try_claim(directory, stale_after=60) is None
  old = time.time() - 120
  os.utime(os.path.join(directory, claims.CLAIM_FILE), (old, old))
  assert claims.try_claim(directory, stale_after=60) is not None


def test_two_processes_on_one_command_share_the_levels(tmp_path):
  args = [sys.executable, "-m", "run_experiments", "--dataset=sklearn_digits",
          "--experiment=reinit_orig", "--trials=4", "--prune_iters=1", "--train_iters=300",
          "--eval_every=300", "--attack=none", "--sharpness_examples=0", "--noprogress",
          "--compile=graph",  # About sharing the levels: no XLA compile per level.
          f"--base_dir={tmp_path}"]
  env = child_env()
  processes = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
  assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]  # The run folder.
  metadata = [json.load(open(path)) for path in
              glob.glob(str(tmp_path / "**" / "metadata.json"), recursive=True)]
  assert len(metadata) == 8 and all(m["completed"] for m in metadata)
  workers = {m["worker"]["pid"] for m in metadata}
  assert workers == {p.pid for p in processes}  # Both worked ...
  # ... each level once: one "training <level>" line per level over both processes.
  started = [line.rsplit(" ", 1)[-1] for _, stderr in outputs
             for line in stderr.splitlines() if "] training " in line]
  assert len(started) == 8 and len(set(started)) == 8, started
  assert not glob.glob(str(tmp_path / "**" / claims.CLAIM_FILE), recursive=True)
