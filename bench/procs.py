"""The processes the benchmark starts, and the guarantee that it ends them.

`Child` runs a long-lived program (a server, the probe, the floor, the sink)
in its own process group, reads its merged output on a thread (timestamping
each line, for time-to-ready) and on `stop()` ends the whole group: SIGTERM,
then SIGKILL after a grace period. Children also get SIGKILL from the kernel
if the benchmark itself dies (PR_SET_PDEATHSIG). `run_tool` runs a bounded
one-shot command such as a load generator.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

_PR_SET_PDEATHSIG = 1
_KILL_WAIT_S = 60


class BenchError(RuntimeError):
    """Something the benchmark needs did not happen; the message says what."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # one group: stop() ends its children too
            preexec_fn=_die_with_parent,
        )
        self.tail: deque[str] = deque(maxlen=40)  # for error messages
        self._lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            self._lines.put((time.monotonic(), line))
        self._lines.put(None)

    def wait_for(self, wanted: Callable[[str], bool], timeout: float) -> tuple[float, str]:
        """The first further line for which ``wanted`` is true, with the
        monotonic time it arrived; BenchError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self._lines.get(timeout=max(remaining, 0))
            except queue.Empty:
                what = f"said nothing wanted within {timeout:.0f} s"
                raise BenchError(self.failure(what)) from None
            if item is None:
                self._lines.put(None)  # stays ended for later callers
                raise BenchError(self.failure(f"exited with {self.process.wait()}"))
            if wanted(item[1]):
                return item

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        """End the process group: SIGTERM, then SIGKILL after ``grace`` seconds.
        Returns the exit status, None if the process outlived even SIGKILL
        (a task detaching BPF programs can sit in the kernel for a while)."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self._signal_group(signal.SIGKILL)  # the process if still there, and its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(_KILL_WAIT_S)
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        self._reader.join(5)
        return self.process.returncode

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def failure(self, what: str) -> str:
        return f"{self.name} (pid {self.pid}) {what}; its last output:\n" + "\n".join(self.tail)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a one-shot command; its output, or BenchError if it fails or
    outlives ``timeout`` (then it is killed)."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from error
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def wait_listening(port: int, timeout: float, child: Child | None = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise BenchError(child.failure(f"exited with {child.process.returncode}"))
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.connect(("127.0.0.1", port))
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
