"""`make bench`'s live benchmark measures a K2 command's whole process tree: since `k2 stream run`
writes each table in a child process, its own process does almost nothing, and measuring only it
reported the stream at 0.00 cores."""

from __future__ import annotations

import subprocess
import sys
import time

# A parent that only waits while its child burns CPU, as `k2 stream run`'s supervisor waits on its tables.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
child.wait()
"""


def test_a_commands_cpu_and_memory_include_its_children(load_benchmark):
    bench = load_benchmark("bench_live")
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        deadline = time.monotonic() + 30
        while len(bench.process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = bench._tree_cpu_seconds(parent.pid), bench._cpu_seconds(parent.pid)
        time.sleep(1.0)
        tree_cpu = bench._tree_cpu_seconds(parent.pid) - before[0]
        own_cpu = bench._cpu_seconds(parent.pid) - before[1]
        assert own_cpu < 0.2, own_cpu
        assert tree_cpu > 0.4, f"the child's second of spinning is counted: {tree_cpu:.2f} s"
        assert bench._tree_peak_mb(parent.pid) > bench._peak_mb(parent.pid)
    finally:
        for pid in bench.process_tree(parent.pid)[1:]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        parent.kill()
        parent.wait()
