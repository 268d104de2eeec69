"""CPU threads when several torch processes share a machine.

torch starts one compute thread per core in every process. Two processes doing that on 2 cores ran a
transformer call 50× slower than one process with one thread (886 ms vs 17 ms), because their threads spin
waiting for each other. So unless OMP_NUM_THREADS says otherwise, a process takes its share of the cores:
the cores divided among the processes a launcher started on this machine (LOCAL_WORLD_SIZE), less the cores
other jobs keep busy right now, and says so in one line.

"Right now" is the machine's CPU time over a short window, not the load average: the 1-minute average still
carries a `pip install` for a minute after it ended, and gave the README's own command half the machine.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 0.3  # long enough to see a spinning job, short enough not to be noticed at start-up


def share_of_cores(cores: int, local_processes: int, busy_cores: float) -> int:
    """Threads for one process: the free cores divided among this launch's processes, at least 1."""
    free = cores - int(round(busy_cores))
    return max(1, min(cores // max(1, local_processes), free // max(1, local_processes)))


def _busy_seconds(cpu_times) -> float:
    """CPU seconds spent on work (everything but idle and I/O wait) in a psutil cpu_times record."""
    return sum(getattr(cpu_times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def _own_seconds(processes) -> float:
    """CPU seconds used so far by these processes and their threads (gone ones count 0)."""
    import psutil

    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _this_launch(psutil):
    """This process, and its siblings when a launcher started several (they share the cores by LOCAL_WORLD_SIZE
    instead, so they are not "other work")."""
    me = psutil.Process()
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return [me]
    try:
        return [me] + [p for p in me.parent().children() if p.pid != me.pid]
    except (psutil.Error, AttributeError):
        return [me]


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """How many cores other work keeps busy now: the machine's busy CPU time over `seconds`, less this launch's."""
    import psutil

    ours = _this_launch(psutil)
    machine_before, ours_before, start = _busy_seconds(psutil.cpu_times()), _own_seconds(ours), time.monotonic()
    time.sleep(seconds)
    machine_after, ours_after = _busy_seconds(psutil.cpu_times()), _own_seconds(ours)
    elapsed = time.monotonic() - start
    return max(0.0, ((machine_after - machine_before) - (ours_after - ours_before)) / elapsed)


def configure_threads(measure=busy_cores) -> int | None:
    """Set torch's CPU thread count (once per process) unless the user chose it; returns what was set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = measure()
    threads = share_of_cores(cores, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), busy)
    if threads < torch.get_num_threads():
        log.info("%d of %d cores busy with other work: using %d CPU threads (set OMP_NUM_THREADS to choose)",
                 min(cores, round(busy)), cores, threads)
        torch.set_num_threads(threads)
    return threads
