"""Readers of what the benchmark's tools and the kernel print: wrk's and
h2load's reports, h2load's per-request log, Prometheus text, /proc/PID/status
and py-spy's raw (collapsed-stack) profiles. Pure functions of text, so
they are tested on captured output."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ParseError(ValueError):
    """A tool printed something the benchmark cannot read."""


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        raise ParseError(f"no {what} in:\n{text.strip()[-2000:]}")
    return found


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int  # completed, whatever their status
    seconds: float
    rps: float
    socket_errors: int
    non_2xx: int  # wrk's "Non-2xx or 3xx responses"

    @property
    def ok_requests(self) -> int:
        return self.requests - self.non_2xx


def parse_wrk(text: str) -> WrkResult:
    done = _search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text, "request count")
    rps = _search(r"^Requests/sec:\s+([\d.]+)", text, "Requests/sec")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done[1]),
        seconds=float(done[2]) * _TIME_UNITS[done[3]],
        rps=float(rps[1]),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


@dataclass(frozen=True, slots=True)
class H2loadResult:
    total: int
    succeeded: int  # 2xx and 3xx
    failed: int
    errored: int
    timeout: int
    seconds: float
    rps: float


def parse_h2load(text: str) -> H2loadResult:
    finished = _search(r"^finished in ([\d.]+)(us|ms|s|m|h), ([\d.]+) req/s", text, "'finished'")
    counts = _search(
        r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
        "request counts",
    )
    total, succeeded, failed, errored, timeout = (int(n) for n in counts.groups())
    return H2loadResult(
        total=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        seconds=float(finished[1]) * _TIME_UNITS[finished[2]],
        rps=float(finished[3]),
    )


def parse_h2load_log(text: str) -> list[int]:
    """Latencies in microseconds of the successful requests in an h2load
    ``--log-file`` (start time µs, status code, µs until the end of the
    response, tab-separated)."""
    latencies = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if 200 <= int(fields[1]) < 400:
            latencies.append(int(fields[2]))
    return latencies


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition, keyed by name (with its
    labels as printed, if any)."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        found = _SAMPLE.match(line)
        if found:
            samples[found[1]] = float(found[2])
    return samples


def status_kib(status: str, field: str) -> int:
    """A ``kB`` figure of /proc/PID/status, such as VmRSS or VmHWM."""
    return int(_search(rf"^{field}:\s+(\d+) kB", status, field)[1])


def parse_fdinfo(text: str) -> dict[str, str]:
    """The ``key:\\tvalue`` lines of /proc/PID/fdinfo/FD."""
    pairs = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs


@dataclass(frozen=True, slots=True)
class Profile:
    """Sample counts of a collapsed-stack profile: ``own`` counts a frame
    when it is the running one (leaf), ``inclusive`` when it is anywhere on
    the stack (once per sample, even if recursive)."""

    samples: int
    own: Counter[str]
    inclusive: Counter[str]

    def top(self, counts: Counter[str], n: int) -> list[tuple[str, float]]:
        """The ``n`` largest entries of ``counts``, as shares of all samples."""
        if not self.samples:
            return []
        return [(frame, count / self.samples) for frame, count in counts.most_common(n)]


# A function mypyc compiled, as py-spy --native names it: its C name,
# CPyDef_<module>___<function> or CPyDef_<module>___<Class>___<method> (CPyPy_
# for the wrapper Python calls), in the C file of the compiled group.
_COMPILED_FRAME = re.compile(r"CPy(?:Def|Py)_([a-z0-9_]+?)___(\w+) \(__native_\w*\.c\)")


def compiled_sources(modules: Sequence[str]) -> dict[str, str]:
    """mypyc's short module names -> source paths, for ``readable_frame``:
    ``probe.protocol.http1`` is ``http1``, ``probe/protocol/http1.py``."""
    return {module.rpartition(".")[2]: module.replace(".", "/") + ".py" for module in modules}


def readable_frame(frame: str, sources: Mapping[str, str]) -> str:
    """A compiled function's frame named as py-spy names an interpreted one,
    ``MessageStream._idle (probe/protocol/http1.py)``; any other as it is."""
    found = _COMPILED_FRAME.fullmatch(frame)
    if found is None or found[1] not in sources:
        return frame
    owner, _, function = found[2].partition("___")
    name = f"{owner}.{function}" if function else owner
    return f"{name} ({sources[found[1]]})"


def parse_collapsed(text: str, compiled: Mapping[str, str] | None = None) -> Profile:
    """py-spy's ``--format raw`` output: ``frame;frame;...;leaf COUNT`` per line.
    With ``compiled`` (`compiled_sources`), compiled functions' frames are
    named as interpreted ones are."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if compiled:
            frames = [readable_frame(frame, compiled) for frame in frames]
        samples += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return Profile(samples, own, inclusive)
