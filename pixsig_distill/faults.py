"""Test support: deterministic crash points for tests/test_faults.py. Does nothing unless told to.

With `PIXSIG_FAULT_AFTER=<event>:<n>` in the environment, the n-th time this process reaches
`fault_point(<event>)` it kills itself with SIGKILL (no cleanup, no `finally`, like a power cut
or the OOM killer). The events, each placed where a crash does the most damage:

* `step`: a training step has updated the weights in memory, but it is not checkpointed (loop.py);
* `checkpoint`: every file of a checkpoint is written and fsynced under `.tmp-step-N/`, before the
  rename that makes it visible (checkpoint.py);
* `image`: an evaluation image is in place, before the manifest vouches for it (evaluation/cache.py).

Without the variable (always, outside the fault tests) `fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PIXSIG_FAULT_AFTER"
_seen: dict[str, int] = {}


def fault_point(event: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != event:
        return
    _seen[event] = _seen.get(event, 0) + 1
    if _seen[event] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
