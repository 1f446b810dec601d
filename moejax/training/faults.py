"""Crash injection for reliability testing (chaos testing of the train loop).

``MOEJAX_CRASH_AT='<point>:<step>'`` makes the trainer SIGKILL itself -- no handlers,
no cleanup, exactly like ``kill -9`` or a host failure -- when it reaches `point` at
`step`. Points:
  after_step   right after train step `step` was dispatched (nothing saved for it yet);
  during_save  right after the (asynchronous) checkpoint save of `step` started, while
               its files are still being written.
Unset (the default), ``maybe_crash`` is a no-op.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "MOEJAX_CRASH_AT"
POINTS = ("after_step", "during_save")


def crash_point() -> tuple[str, int] | None:
  """The configured (point, step), or None; a malformed value is an error."""
  spec = os.environ.get(ENV_VAR)
  if not spec:
    return None
  point, _, step = spec.partition(":")
  if point not in POINTS or not step.isdigit():
    raise ValueError(
      f"{ENV_VAR}={spec!r} is invalid: expected '<point>:<step>' with point in {POINTS}"
    )
  return point, int(step)


def maybe_crash(point: str, step: int) -> None:
  """SIGKILLs this process if `MOEJAX_CRASH_AT` names (point, step)."""
  if crash_point() == (point, step):
    os.kill(os.getpid(), signal.SIGKILL)
