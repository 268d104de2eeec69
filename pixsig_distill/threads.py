"""CPU threads when several torch processes share a machine.

torch starts one compute thread per core in every process. Two processes doing that on 2 cores ran a
transformer call 50× slower than one process with one thread (886 ms vs 17 ms), because their threads spin
waiting for each other. So unless OMP_NUM_THREADS says otherwise, a process takes its share of the cores:
the cores divided among the processes a launcher started on this machine (LOCAL_WORLD_SIZE), less the cores
other jobs already keep busy (the 1-minute load average), and says so in one line.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def share_of_cores(cores: int, local_processes: int, busy_cores: float) -> int:
    """Threads for one process: the free cores divided among this launch's processes, at least 1."""
    free = cores - int(round(busy_cores))
    return max(1, min(cores // max(1, local_processes), free // max(1, local_processes)))


def configure_threads() -> int | None:
    """Set torch's CPU thread count (once per process) unless the user chose it; returns what was set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = share_of_cores(cores, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), busy)
    if threads < torch.get_num_threads():
        log.info("%d of %d cores busy with other work: using %d CPU threads (set OMP_NUM_THREADS to choose)",
                 min(cores, round(busy)), cores, threads)
        torch.set_num_threads(threads)
    return threads
