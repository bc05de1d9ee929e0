"""``make demo``: a chain of four services, the probe watching, three requests, their traces.

    curl -> frontend (Python) -> orders (Go) -> inventory (Node.js) -> db (Python, 300 ms)

The services are the end-to-end tests' chain programs (tests/e2e/programs/
chain_*), started on loopback with ports of their own; none of them knows
anything of tracing. The probe runs as ``probe capture -o tree``, limited to
the chain's ports, and prints one waterfall per request: the database's span
is marked as the one with the most self time. Needs root, Go and Node.js.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ROOT / "tests" / "e2e" / "programs"
REQUESTS = ("/checkout?cart=1", "/checkout?cart=2", "/orders/42")
READY_TIMEOUT_S = 120


def start(stack: ExitStack, name: str, command: list[str]) -> str:
    """Start one service; its URL once it listens."""
    env = {**os.environ, "OTEL_SERVICE_NAME": name}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    stack.callback(stop, process)
    assert process.stdout is not None
    port = process.stdout.readline().strip()
    if not port.isdigit():
        sys.exit(f"demo: {name} did not start")
    return f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()


def build_go(workdir: str) -> str:
    binary = os.path.join(workdir, "chain_go")
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": os.path.join(workdir, "cache")}
    env["GOPATH"] = os.path.join(workdir, "gopath")
    subprocess.run(
        ["go", "build", "-o", binary, "main.go"], cwd=PROGRAMS / "chain_go", env=env, check=True
    )
    return binary


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("demo: run as root (the probe loads BPF programs)")
    python = sys.executable
    with ExitStack() as stack, tempfile.TemporaryDirectory() as workdir:
        chain_py = [python, str(PROGRAMS / "chain_py.py"), "--host", "127.0.0.1"]
        db = start(stack, "db", [*chain_py, "--name", "db", "--delay-ms", "300"])
        node = ["node", str(PROGRAMS / "chain_node.js"), "--host", "127.0.0.1"]
        inventory = start(stack, "inventory", [*node, "--downstream", db])
        go = [build_go(workdir), "-listen", "127.0.0.1:0"]
        orders = start(stack, "orders", [*go, "-downstream", inventory])
        frontend = start(stack, "frontend", [*chain_py, "--name", "web", "--downstream", orders])
        ports = [url.rpartition(":")[2] for url in (frontend, orders, inventory, db)]
        command = [python, "-m", "probe", "capture", "-o", "tree"]
        command += [arg for port in ports for arg in ("-P", port)]
        print("$ probe", " ".join(command[3:]), file=sys.stderr, flush=True)
        probe = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stack.callback(stop, probe)
        assert probe.stderr is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in probe.stderr:
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        for target in REQUESTS:
            print(f"$ curl {frontend}{target}", file=sys.stderr, flush=True)
            subprocess.run(["curl", "-sS", "-o", "/dev/null", frontend + target], check=True)
        time.sleep(1)  # let the last trace's wait end
        probe.send_signal(signal.SIGINT)
        sys.stderr.write(probe.stderr.read())
        probe.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
