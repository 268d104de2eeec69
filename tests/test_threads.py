"""The thread share judges other work by what is busy now, not by a lagging load average (issue: the README's
command trained on half the machine right after its own `pip install`)."""

import os
import subprocess
import sys
import time

import torch

from pixsig_distill import threads


def test_a_machine_that_just_finished_an_install_gets_every_core(monkeypatch):
    # the 1-minute load average still says two cores are busy; the CPU-time sample says nothing is
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 1.5, 0.7))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.configure_threads(measure=lambda: 0.05) == 2
        assert torch.get_num_threads() == 2
        assert threads.configure_threads(measure=lambda: 1.0) == 1  # one core really busy: half
    finally:
        torch.set_num_threads(before)


def test_a_spinning_process_is_counted_and_this_process_is_not():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        assert threads.busy_cores(0.5) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
    # this process spinning in the window (a thread keeps it busy) is counted as this launch's own time, which
    # busy_cores subtracts from the machine's (measured directly: other test workers may load the machine too)
    import threading

    import psutil

    ours = threads._this_launch(psutil)
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    before, start = threads._own_seconds(ours), time.monotonic()
    worker.start()
    try:
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    assert (threads._own_seconds(ours) - before) / (time.monotonic() - start) >= 0.4
