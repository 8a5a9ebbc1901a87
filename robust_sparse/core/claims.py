"""Claims on level folders, so that processes sharing one run folder never train a level twice.

Several processes (or machines, or Ray workers) started on the same command and
`--base_dir` share the work: before training a level, a process claims its
folder by creating `claim.json` with `O_CREAT | O_EXCL` (atomic on local and
NFS v3+ file systems), holding the host, the process id, a random token and
the time. While the level trains, a heartbeat thread touches the file every
`HEARTBEAT_SECONDS`. A claim is stale when its process is gone (same host, pid
not alive) or its heartbeat is older than `STALE_SECONDS` (any host); a stale
claim is taken over by renaming it away (only one of several takers can
rename the same file) and claiming afresh. A finished level is never redone:
the runner checks `metadata.json` before claiming and again after.

    claim = try_claim(level_folder)
    if claim is not None:
      with claim:
        train()
"""

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

CLAIM_FILE = "claim.json"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  try:  # A killed process its parent has not reaped yet (a zombie) is dead too.
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def read_claim(directory: str) -> Optional[dict]:
  """The claim on `directory` ({host, pid, token, time, heartbeat_age}), or None."""
  path = os.path.join(directory, CLAIM_FILE)
  try:
    with open(path) as f:
      info = json.load(f)
    info["heartbeat_age"] = time.time() - os.stat(path).st_mtime
  except (OSError, ValueError):  # Gone, or being written: its mtime is fresh.
    return None
  return info


def is_stale(info: dict, stale_after: float = STALE_SECONDS) -> bool:
  """Whether the claim `info` (from `read_claim`) may be taken over."""
  if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1))):
    return True
  return info.get("heartbeat_age", 0.0) > stale_after


class Claim:
  """A held claim: a context manager that heartbeats while entered and releases on exit."""

  def __init__(self, path: str, token: str, heartbeat: float):
    self.path = path
    self.token = token
    self._heartbeat = heartbeat
    self._stop = threading.Event()
    self._thread = None

  def _beat(self):
    while not self._stop.wait(self._heartbeat):
      try:
        os.utime(self.path)
      except OSError:
        return

  def __enter__(self):
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self.release()

  def release(self):
    """Stops the heartbeat and removes the claim file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      with open(self.path) as f:
        ours = json.load(f).get("token") == self.token
    except (OSError, ValueError):
      return
    if ours:
      try:
        os.remove(self.path)
      except OSError:
        pass


def try_claim(directory: str, *, stale_after: float = STALE_SECONDS,
              heartbeat: float = HEARTBEAT_SECONDS) -> Optional[Claim]:
  """Claims `directory` for this process; None when another live process holds it."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, CLAIM_FILE)
  token = uuid.uuid4().hex
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      info = read_claim(directory)
      if info is None or not is_stale(info, stale_after):
        return None
      # Take a stale claim over: one renamer wins, the others find the file gone.
      moved = f"{path}.stale-{token}"
      try:
        os.replace(path, moved)
      except OSError:
        continue
      try:
        with open(moved) as f:
          taken = json.load(f).get("token")
      except (OSError, ValueError):
        taken = None
      if taken is not None and taken != info.get("token"):
        # A faster taker's fresh claim was moved: give it back unless replaced again.
        try:
          os.link(moved, path)
        except OSError:
          pass
      try:
        os.remove(moved)
      except OSError:
        pass
      continue
    with os.fdopen(fd, "w") as f:
      json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                 "time": time.time()}, f)
    return Claim(path, token, heartbeat)
  return None
