"""`probe run`: the host daemon. Traces until SIGTERM/SIGINT, ships spans
over OTLP, serves its own metrics and health on localhost, and on stop
flushes the export queue within a deadline."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from probe import compiled
from probe.commands.capture import (
    StopFlag,
    add_exchange_rate_argument,
    add_link_wait_argument,
    plain_names,
)
from probe.config import ConfigError, ProbeConfig, load
from probe.export.otlp import create_processor
from probe.kernel.features import ProbeError
from probe.kernel.governor import RateGovernor, cpu_stall_us
from probe.kernel.loader import EventSource, ProbeOptions
from probe.logs import configure
from probe.metrics import MetricsServer
from probe.pipeline import Pipeline, ProcessFilter, exporter_endpoints
from probe.stats import Stats
from probe.trace.kubernetes import PodMetadata
from probe.trace.resource import ResourceDetector

SHUTDOWN_DEADLINE_MS = 10_000
# This process's session's scheduling group (an autogroup): its nice.
AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUP_ATTEMPTS = 3
AUTOGROUP_RETRY_S = 0.1
GC_YOUNG_THRESHOLD = 10_000  # objects made between collections of the youngest generation

EXAMPLES = """examples:
  probe run                                   # OTLP/HTTP to localhost:4318/v1/traces
  OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 \\
  OTEL_EXPORTER_OTLP_PROTOCOL=grpc probe run
  probe run --config /etc/probe/probe.yaml -P 8080
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the host daemon: trace until stopped and export spans over OTLP",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults are None: "not given", so the environment and file decide.
    parser.add_argument("--config", metavar="FILE", help="YAML settings (see deploy/probe.yaml)")
    parser.add_argument(
        "-p",
        "--pid",
        dest="pids",
        type=int,
        action="append",
        help="trace only this process (repeatable)",
    )
    parser.add_argument(
        "-P",
        "--port",
        dest="ports",
        type=int,
        action="append",
        help="trace only connections with this local or remote port",
    )
    parser.add_argument(
        "--comm",
        dest="comm_patterns",
        action="append",
        metavar="GLOB",
        help="trace only processes whose name matches (repeatable)",
    )
    parser.add_argument(
        "--exclude-comm",
        dest="exclude_comm_patterns",
        action="append",
        metavar="GLOB",
        help="never trace processes whose name matches, e.g. a load generator (repeatable)",
    )
    parser.add_argument(
        "--exe",
        dest="exe_patterns",
        action="append",
        metavar="GLOB",
        help="trace only executables whose path matches (repeatable)",
    )
    parser.add_argument(
        "--container",
        dest="container_ids",
        action="append",
        metavar="ID",
        help="trace only processes in this container (id or prefix)",
    )
    parser.add_argument("--otlp-endpoint", dest="otlp_endpoint", metavar="URL")
    parser.add_argument("--otlp-protocol", dest="otlp_protocol", choices=("grpc", "http/protobuf"))
    parser.add_argument(
        "--metrics-address",
        dest="metrics_address",
        metavar="HOST:PORT",
        help="where /metrics and /healthz listen (default 127.0.0.1:9464)",
    )
    parser.add_argument("--log-format", dest="log_format", choices=("text", "json"))
    parser.add_argument("--capture-bytes", dest="capture_size", type=int, metavar="N")
    add_exchange_rate_argument(parser, default=None)  # the configuration's, unless given
    add_link_wait_argument(parser)
    parser.set_defaults(command=run)  # fmt: skip


def overrides(args: argparse.Namespace) -> dict[str, object]:
    names = (
        "pids", "ports", "comm_patterns", "exclude_comm_patterns", "exe_patterns", "container_ids",
        "otlp_endpoint", "otlp_protocol", "metrics_address", "log_format", "capture_size",
        "max_exchange_rate",
    )  # fmt: skip
    return {name: getattr(args, name) for name in names}


def kernel_options(config: ProbeConfig) -> ProbeOptions:
    # One plain process name to trace, and any plain names not to, can be
    # filtered in the kernel; globs need user space.
    plain = plain_names(config.comm_patterns)
    comm = plain[0] if len(config.comm_patterns) == 1 and plain else None
    return ProbeOptions(
        capture_bytes=config.capture_size,
        exchange_rate=config.max_exchange_rate,
        pids=config.pids,
        ports=config.ports,
        comm=comm,
        excluded_comms=plain_names(config.exclude_comm_patterns),
    )


def rate_governor(
    config: ProbeConfig, source: EventSource, backlog: Callable[[], float]
) -> RateGovernor | None:
    """What lowers the exchange rate limit while the CPU is short or the
    export behind (``backlog``, the share of its queue in use). There must be
    a limit; the CPU is left out without a pressure limit or a kernel that
    reports CPU pressure (said once, in the log)."""
    if not config.max_exchange_rate:
        return None
    pressure_limit = config.cpu_pressure_limit or None
    if pressure_limit is not None and cpu_stall_us() is None:
        logging.getLogger(__name__).info(
            "this kernel does not report CPU pressure (/proc/pressure/cpu): the exchange "
            "rate limit stays at %d a second however short the CPU, falling only while "
            "the export is behind",
            config.max_exchange_rate,
        )
        pressure_limit = None
    return RateGovernor(
        source.set_exchange_rate,
        maximum=config.max_exchange_rate,
        minimum=min(config.min_exchange_rate, config.max_exchange_rate),
        pressure_limit=pressure_limit,
        backlog=backlog,
        records=lambda: source.stats["events"],
    )


def lower_priority(nice: int, autogroup: Path = AUTOGROUP) -> str:
    """Give every thread of this process ``nice``, and its session's scheduling
    group too when it leads that session; says what was done, for the log.

    Linux keeps a nice value per thread, so each existing one is set; threads
    started later (export, metrics, gRPC's own) inherit it. A nice value only
    orders the threads of one scheduling group, though. With autogroups (on by
    default) each session is a group, and groups share the CPU as equals
    whatever their threads' nice: a probe at nice 10 in a session of its own
    took as much of a shared CPU as the service it traced, in runs of a few
    milliseconds that the service's requests waited out. A daemon leads its
    own session (under systemd, in a container, after setsid), and the
    group's nice is set too. Started from a shell it does not, and changing
    the shell's group would lower every program in it. Under a cgroup's CPU
    controller the cgroup's weight decides instead (the systemd unit's
    CPUWeight, a container's CPU request)."""
    for tid in os.listdir("/proc/self/task"):
        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    if not autogroup.exists():  # a kernel without autogroups: threads are all there is
        return f"CPU priority: nice {nice}"
    if os.getsid(0) != os.getpid():
        return (
            f"CPU priority: nice {nice} for its threads, which orders them only among"
            " the programs of its session: other sessions share the CPU with it as"
            " equals (run it as a service, or under setsid, for nice to apply)"
        )
    problem = _set_session_nice(nice, autogroup)
    if problem:
        return f"CPU priority: nice {nice} for its threads; its session's: {problem}"
    return f"CPU priority: nice {nice}, for its threads and its session"


def _set_session_nice(nice: int, autogroup: Path) -> str | None:
    """None once the session's group has ``nice``; else why it has not."""
    try:
        if not autogroup.read_text():
            # Init's session, never left for one of its own: its group is the
            # root one, whose share the kernel does not let nice change.
            return "the root scheduling group, left as it was"
        for _ in range(AUTOGROUP_ATTEMPTS):
            try:
                autogroup.write_text(str(nice))
                return None
            except BlockingIOError:  # one change a machine per 100 ms without CAP_SYS_ADMIN
                time.sleep(AUTOGROUP_RETRY_S)
    except OSError as error:
        return str(error)
    return "busy, left as it was"


def settle_heap() -> None:
    """The garbage collector set for a running daemon, once start-up is done.

    What start-up made (modules, bcc's tables, parsers, caches) lives as long
    as the process: full collections need not walk it again. A request makes
    some ten objects the collector tracks and reference counting frees nearly
    all of them (nothing on the hot path is left in a cycle): collecting every
    700 of them, as Python does by default, mostly walks spans waiting for
    export."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run(args: argparse.Namespace) -> int:
    try:
        config = load(overrides(args), os.environ, args.config)
    except (ConfigError, OSError) as error:
        print(f"probe: configuration: {error}", file=sys.stderr)
        return 2
    log = configure(config.log_format)
    log.info("%s", lower_priority(config.nice))
    stats = Stats()
    source = EventSource(kernel_options(config), stats)
    stop = StopFlag()
    try:
        source.start()
    except ProbeError as error:
        log.error("%s", error)
        return 1
    processor = create_processor(config, stats)
    metrics = MetricsServer(
        stats,
        processor,
        address=config.metrics_address,
        health_threshold_s=config.health_threshold_s,
    )
    try:
        host, port = metrics.start()
    except OSError as error:
        log.error("cannot serve metrics on %s:%s: %s", *config.metrics_address, error)
        source.close()
        processor.shutdown(0)
        return 1
    pods = PodMetadata.from_environment()  # None outside a cluster (says so once)
    if pods is not None:
        pods.start()
    try:
        for note in source.notes:
            log.info("%s", note)
        log.info("hot path %s", compiled.running_status())
        log.info(
            "exporting spans over OTLP (%s) to %s; metrics on http://%s:%s/metrics",
            config.otlp_protocol, config.otlp_endpoint, host, port,
        )  # fmt: skip
        print("ready", file=sys.stderr, flush=True)
        governor = rate_governor(config, source, processor.backlog)
        pipeline = Pipeline(
            source,
            [processor],
            stats,
            resources=ResourceDetector(
                extra_attributes=config.resource_attributes, kubernetes=pods
            ),
            process_filter=ProcessFilter(
                config.comm_patterns,
                config.exe_patterns,
                config.container_ids,
                config.exclude_comm_patterns,
            ),
            capture_credentials=config.capture_credentials,
            redact_query=config.redact_query,
            capture_headers=config.header_allowlist,
            link_wait_ns=args.link_wait_ms * 1_000_000,
            on_tick=[governor.tick] if governor else [],
            untraced_endpoints=exporter_endpoints(config.otlp_endpoint),
        )
        settle_heap()
        pipeline.run(stop)
        log.info("stopping: flushing %d queued spans", processor.queue_depth())
        pipeline.finish(SHUTDOWN_DEADLINE_MS)
    finally:
        if pods is not None:
            pods.stop()
        metrics.stop()
        source.close()
    log.info(
        "stopped: %d spans produced, %d exported, %d dropped",
        stats["spans_produced"], stats["spans_exported"], stats["spans_dropped"],
    )  # fmt: skip
    return 0
