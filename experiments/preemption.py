"""Clean stops: SIGTERM/SIGINT end a run at the next step boundary, after a checkpoint.

A run stopped that way exits with `EXIT_PREEMPTED` (75, sysexits.h EX_TEMPFAIL: "try again"),
so a scheduler can tell "preempted, requeue me" from "finished" (0) and "failed" (1).
"""
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np

EXIT_PREEMPTED = 75


class StopSignal:
  """Records SIGTERM/SIGINT so the loop can checkpoint and exit at the next step boundary."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def received_anywhere(self) -> bool:
    """Whether any process got a signal (a collective on several processes: all stop at the
    same step, since each save and train step is one)."""
    if jax.process_count() == 1:
      return self.received is not None
    flags = multihost_utils.process_allgather(np.asarray(self.received is not None))
    return bool(np.any(flags))

  @property
  def reason(self) -> str | None:
    return signal.Signals(self.received).name if self.received is not None else None
