"""A stop of `k2 stream run` ends in bounded time even when a table's process cannot stop itself
(`k2.stream.processes`): its loop wedged in a C call never runs the SIGTERM handler. Real
processes here, whose "wedge" is a SIGTERM they ignore: to the supervisor they look the same."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import psutil
import pytest

from k2.stopping import StopFlag
from k2.stream import processes

_fork = multiprocessing.get_context("fork")


@dataclass
class _Child:
    kind: str
    process: BaseProcess


def _deaf() -> None:
    """A table's process whose loop never gets to its SIGTERM handler."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def _obliging() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(120)


def _started(target, *, daemon: bool = True) -> BaseProcess:
    process = _fork.Process(target=target, daemon=daemon)
    process.start()
    return process


def test_a_stop_kills_a_table_process_still_running_after_the_grace_and_the_run_fails():
    deaf, obliging = _Child("trades", _started(_deaf)), _Child("quotes", _started(_obliging))
    time.sleep(0.3)  # both have installed their handlers
    flag = StopFlag("test.stopping")
    flag.stop = True
    started = time.monotonic()
    try:
        processes._supervise([deaf, obliging], flag, grace=1.0)
    finally:
        for child in (deaf, obliging):
            child.process.kill()
    took = time.monotonic() - started
    assert 1.0 <= took < 10, f"the supervisor returned after {took:.1f} s with a 1 s grace"
    assert obliging.process.exitcode == 0, "a process that stops on SIGTERM is not killed"
    assert deaf.process.exitcode == -signal.SIGKILL, "the deaf process was killed, so the run fails"


def _orphan_watch(grace: float) -> None:
    """A supervisor's child that ignores SIGTERM, watching for its supervisor to go."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=processes._stop_when_orphaned, args=(grace,), daemon=True).start()
    time.sleep(120)


def _supervisor(grace: float, pids) -> None:
    child = _fork.Process(target=_orphan_watch, args=(grace,))
    child.start()
    pids.put(child.pid)
    time.sleep(120)


@pytest.mark.timeout(60)
def test_a_table_process_whose_supervisor_was_killed_exits_even_when_sigterm_does_not_end_it():
    pids = _fork.Queue()
    supervisor = _started(lambda: _supervisor(1.0, pids), daemon=False)  # it has a child
    child = psutil.Process(pids.get(timeout=10))
    time.sleep(0.3)
    supervisor.kill()
    supervisor.join(10)
    started = time.monotonic()
    try:
        child.wait(timeout=20)  # not our child: psutil polls for its end
    finally:
        if child.is_running():
            child.kill()
    took = time.monotonic() - started
    assert 1.0 <= took < 10, f"the orphan exited {took:.1f} s after its supervisor died, with a 1 s grace"
