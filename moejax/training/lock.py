"""One trainer per workdir: a lock object ``<workdir>/trainer.lock`` holding the owner id
(host, pid, run id) and a heartbeat time the owner refreshes; a lock whose heartbeat is
older than `stale_after_s`, or whose owner is a dead process on this host (a kill -9 and
restart), belongs to a dead trainer and is taken over.

Creation is create-if-absent: ``O_EXCL`` on a local disk; on an object store (no such
primitive through epath) the lock is written, then read back after a short settle time,
and the last writer wins -- the loser sees another owner and stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from moejax.training.paths import as_path, is_uri, write_text_atomic

LOCK_FILE = "trainer.lock"
log = logging.getLogger(__name__)


class WorkdirLocked(RuntimeError):
  """Another live trainer owns the workdir."""


def owner_id(run_id: str) -> str:
  return f"{socket.gethostname()}:{os.getpid()}:{run_id}"


def _owner_dead(owner: str) -> bool:
  """True if `owner` names a process of this host that no longer exists."""
  host, _, rest = str(owner).partition(":")
  pid = rest.partition(":")[0]
  if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


class WorkdirLock:
  """``acquire()`` / ``release()``; a daemon thread refreshes the heartbeat every
  `stale_after_s` / 5 seconds while held."""

  def __init__(self, workdir, owner: str, stale_after_s: float, settle_s: float = 1.0):
    self.path = as_path(workdir) / LOCK_FILE
    self.owner = owner
    self.stale_after_s = stale_after_s
    self.settle_s = settle_s
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> str:
    return json.dumps({"owner": self.owner, "heartbeat": time.time()})

  def read(self) -> dict | None:
    """The lock's {'owner', 'heartbeat'}; None if absent; a torn lock reads as stale."""
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {"owner": "<unreadable lock>", "heartbeat": 0.0}

  def _create_exclusive(self) -> bool:
    """Writes the lock if absent; False if it exists."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(self.path):
      if self.path.exists():
        return False
      write_text_atomic(self.path, self._record())
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._record())
    return True

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirLocked naming the live owner."""
    if not self._create_exclusive():
      held = self.read() or {"owner": "<vanished>", "heartbeat": 0.0}
      age = time.time() - float(held.get("heartbeat", 0.0))
      if age < self.stale_after_s and not _owner_dead(held.get("owner", "")):
        raise WorkdirLocked(
          f"{self.path.parent} is in use by trainer {held.get('owner')} (heartbeat {age:.0f}s "
          f"ago); stop it or wait {self.stale_after_s - age:.0f}s for its lock to go stale "
          f"(train.lock_timeout_s={self.stale_after_s:g})"
        )
      log.warning(
        "Taking over the stale lock of %s (dead, or no heartbeat for %.0fs) in %s",
        held.get("owner"),
        age,
        self.path.parent,
      )
      write_text_atomic(self.path, self._record())
    if is_uri(self.path):
      time.sleep(self.settle_s)  # let a concurrent writer's object land; the last one wins
    held = self.read()
    if not held or held.get("owner") != self.owner:
      raise WorkdirLocked(
        f"{self.path.parent} was claimed at the same time by trainer {(held or {}).get('owner')}"
      )
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")
    self._thread.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.stale_after_s / 5):
      try:
        write_text_atomic(self.path, self._record())
      except OSError as e:  # a transient store error must not kill the run
        log.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if this trainer still owns it."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    held = self.read()
    if held and held.get("owner") == self.owner:
      self.path.unlink(missing_ok=True)
