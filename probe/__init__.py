"""probe: traces HTTP requests of unmodified programs with eBPF.

The data flows one way through the subpackages:
kernel (BPF load, attach, event decoding) -> protocol (HTTP parsing and
request/response pairing) -> trace (spans and resources) -> export (console,
JSON lines, OTLP) -> commands (`capture`, `check`, `run`).
"""

__version__ = "0.1.0"

# Before any hot-path module is imported: decides whether their compiled
# extensions may run (see probe.compiled).
from probe import compiled as _compiled  # noqa: E402, F401
