"""What the benchmark reads of a running process: its CPU time, from outside."""

from __future__ import annotations

import subprocess
import sys

from bench import observe

# Two threads burn CPU and end; the process then reports its own CPU time and waits.
_BURN = """
import sys, threading, time
def burn():
    end = time.thread_time() + 0.15
    while time.thread_time() < end:
        pass
threads = [threading.Thread(target=burn) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(time.process_time(), flush=True)
sys.stdin.read()
"""


def test_cpu_seconds_counts_ended_threads_to_the_millisecond() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        own = float(child.stdout.readline())
        seen = observe.cpu_seconds(child.pid)
    finally:
        child.stdin.close()
        child.wait(10)
    assert own >= 0.3  # both threads' time, though they have ended
    assert own <= seen < own + 0.005  # what it reported, and at most its last few lines
