"""The probe's settings: one `ProbeConfig`, loaded by `load` from four layers.

Precedence, highest first: command-line flags, environment variables, the YAML
file given with ``--config FILE``, defaults. Each setting is taken whole from
the highest layer that has it (a mapping from the environment replaces the
file's, it is not merged). A bad value raises `ConfigError` naming the setting
and where it came from.

The environment variables are OpenTelemetry's, where it has one; each
``OTEL_EXPORTER_OTLP_TRACES_*`` variable wins over its ``OTEL_EXPORTER_OTLP_*``
twin. ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL: for ``http/protobuf``
``/v1/traces`` is appended; ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, the file's
``exporter.endpoint`` and the flag are used as they are. Header and resource
attribute lists are ``key=value,key2=value2``, percent-decoded.

The YAML file (every key optional; the variables are in brackets)::

    exporter:
      endpoint: http://collector:4318/v1/traces  # [OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT]
      protocol: http/protobuf          # http/protobuf | grpc [.._PROTOCOL]
      headers: {api-key: secret}       # [.._HEADERS]
      timeout_ms: 10000                # [.._TIMEOUT]
      compression: none                # gzip | none [.._COMPRESSION]
      certificate: /etc/ssl/ca.pem     # trusted CA for TLS [.._CERTIFICATE]
      insecure: false                  # plaintext gRPC for a scheme-less endpoint [.._INSECURE]
    resource_attributes:               # added to every span's resource [OTEL_RESOURCE_ATTRIBUTES]
      deployment.environment: prod
    batch:
      max_queue_size: 8192             # [OTEL_BSP_MAX_QUEUE_SIZE]
      max_queue_bytes: 16777216        # [PROBE_MAX_QUEUE_BYTES]
      max_export_batch_size: 512       # [OTEL_BSP_MAX_EXPORT_BATCH_SIZE]
      schedule_delay_ms: 5000          # [OTEL_BSP_SCHEDULE_DELAY]
      export_timeout_ms: 30000         # [OTEL_BSP_EXPORT_TIMEOUT]
    metrics:
      address: 127.0.0.1:9464          # /metrics and /healthz [PROBE_METRICS_ADDRESS]
      health_threshold_s: 60           # /healthz fails after export fails this long
                                       # [PROBE_HEALTH_THRESHOLD]
    log_format: text                   # text | json [PROBE_LOG_FORMAT]
    nice: 10                           # 0-19: CPU priority below the traced programs' [PROBE_NICE]
    capture:
      size: 4096                       # payload bytes copied per message [PROBE_CAPTURE_SIZE]
      max_exchange_rate: 10000         # exchanges traced per second, host-wide; the rest
                                       # are shed in the kernel and counted; 0: no limit
                                       # [PROBE_MAX_EXCHANGE_RATE]
      cpu_pressure_limit: 0.1          # while tasks wait for a CPU this share of the time,
                                       # trace fewer exchanges (as while the export is behind);
                                       # 0: not for the CPU [PROBE_CPU_PRESSURE_LIMIT]
      min_exchange_rate: 1000          # ... but at least these a second [PROBE_MIN_EXCHANGE_RATE]
      credentials: false               # keep Authorization, Cookie... [PROBE_CAPTURE_CREDENTIALS]
      redact_query: true               # blank query values in URLs [PROBE_REDACT_QUERY]
      header_allowlist: [user-agent]   # headers recorded as attributes [PROBE_HEADER_ALLOWLIST]
    filters:                           # empty: trace everything
      pids: [1234]                     # [PROBE_PIDS]
      ports: [80, 8080]                # [PROBE_PORTS]
      comm: [nginx*]                   # globs on the process name [PROBE_COMM]
      exclude_comm: [wrk, kube-probe*] # never these process names [PROBE_EXCLUDE_COMM]
      exe: [/usr/bin/*]                # globs on the executable path [PROBE_EXE]
      containers: [3f4e1a2b9c0d]       # container ids or prefixes [PROBE_CONTAINERS]

Command-line overrides are passed to `load` by field name (``otlp_endpoint``,
``pids``...); a None value means "not given", so an argparse namespace whose
defaults are None can be passed as ``vars(args)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

# http/protobuf by default, as the OTLP exporter specification recommends;
# here it also costs less: no threads of gRPC's own, and at 1,000 requests/s
# 13.2-13.3 rather than 15.2-16.1 us of probe CPU per request (bench/README.md).
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
# Exchanges (request/response pairs) traced per second, host-wide, by default:
# at 9-20 us of the probe's CPU each, about a tenth of a core. Beyond it the
# kernel sheds whole exchanges and counts them (probe_exchanges_shed_total),
# so the probe's cost stays bounded on a saturated node (bench/README.md).
DEFAULT_EXCHANGE_RATE = 10_000
# The least it is lowered to while the CPU is short: still a trace of each
# kind of request every second or so on a busy node.
DEFAULT_MIN_EXCHANGE_RATE = 1_000
# The share of time tasks wait for a CPU at which it is lowered: this VM read
# 2-3 % at 5,000 requests a second, 5-28 % saturated with the probe.
DEFAULT_CPU_PRESSURE_LIMIT = 0.1
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318/v1/traces"
_GENERIC_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"


class ConfigError(ValueError):
    """A setting has a value the probe cannot use."""


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    otlp_endpoint: str = DEFAULT_HTTP_ENDPOINT
    otlp_protocol: str = DEFAULT_PROTOCOL  # or "grpc"
    otlp_headers: dict[str, str] = field(default_factory=dict)
    otlp_timeout_ms: int = 10_000
    otlp_compression: str = "none"  # or "gzip"
    otlp_certificate: str | None = None
    otlp_insecure: bool = False
    resource_attributes: dict[str, str] = field(default_factory=dict)
    # Spans, not OpenTelemetry's 2048: a poll hands on what the kernel sent
    # since the last (up to pipeline.POLL_MS, 0.5 s: 5,000 spans at the default
    # exchange rate limit), in one go that holds the interpreter lock, while
    # a batch may be in flight. At 2048 a chain of services at 1,000
    # requests/s (3,000 spans/s) dropped some in bursts; the byte bound below
    # still caps the memory.
    bsp_max_queue_size: int = 8192
    bsp_max_queue_bytes: int = 16 * 1024 * 1024
    bsp_max_export_batch_size: int = 512
    bsp_schedule_delay_ms: int = 5000
    bsp_export_timeout_ms: int = 30_000
    metrics_address: tuple[str, int] = ("127.0.0.1", 9464)
    health_threshold_s: float = 60.0
    log_format: str = "text"  # or "json"
    # The daemon's CPU priority (nice value). When the CPU is short, the
    # programs it watches come first: the probe then falls behind, and the
    # kernel counts the events it had to drop, instead of the probe taking
    # CPU time from the workload. 0 competes as an equal.
    nice: int = 10
    capture_size: int = 4096
    max_exchange_rate: int = DEFAULT_EXCHANGE_RATE
    # While tasks wait for a CPU this share of the time or more (Linux's CPU
    # pressure) and under a fifth of it is idle, the exchange rate limit is
    # lowered, down to min_exchange_rate, and raised back once that passes
    # (probe/kernel/governor.py).
    # 0: the limit stays where it is.
    min_exchange_rate: int = DEFAULT_MIN_EXCHANGE_RATE
    cpu_pressure_limit: float = DEFAULT_CPU_PRESSURE_LIMIT
    capture_credentials: bool = False
    redact_query: bool = True
    header_allowlist: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    comm_patterns: tuple[str, ...] = ()
    exclude_comm_patterns: tuple[str, ...] = ()
    exe_patterns: tuple[str, ...] = ()
    container_ids: tuple[str, ...] = ()


# -- value parsers: each takes a string (flag, variable) or a YAML value ----


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value).lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum else f"at least {minimum}"
            raise ValueError(f"must be {bound}, got {number}")
        return number

    return parse


def _number(what: str, below: float | None = None) -> Callable[[object], float]:
    """A number from 0, and under ``below`` if given."""

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected {what}, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
        if not number >= 0:  # also rejects NaN
            raise ValueError(f"must be at least 0, got {value!r}")
        if below is not None and not number < below:
            raise ValueError(f"must be under {below:g}, got {value!r}")
        return number

    return parse


_seconds = _number("a number of seconds")
_share = _number("a share, 0 to 1", below=1)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _pairs(value: object) -> dict[str, str]:
    """A mapping, or ``k=v,k2=v2`` with percent-encoded keys and values."""
    if isinstance(value, Mapping):
        return {_text(k): str(v) for k, v in value.items()}
    result = {}
    for item in _text(value).split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item.strip()!r}")
        result[unquote(key.strip())] = unquote(val.strip())
    return result


def _many(parse_item: Callable[[object], Any]) -> Callable[[object], tuple]:
    """A YAML list, or a comma-separated string."""

    def parse(value: object) -> tuple:
        if isinstance(value, str):
            items: list[object] = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(parse_item(item) for item in items)

    return parse


def _address(value: object) -> tuple[str, int]:
    """``host:port``, with IPv6 hosts in brackets: ``[::1]:9464``."""
    text = _text(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets: {text!r}")
    return host, _int(0, 65535)(port)


def _existing_file(value: object) -> str:
    path = _text(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path!r}")
    return path


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")


def _header_name(value: object) -> str:
    name = _text(value).lower()
    if not _HEADER_NAME.match(name):
        raise ValueError(f"not an HTTP header name: {value!r}")
    return name


# -- the settings ----


@dataclass(frozen=True, slots=True)
class _Setting:
    field: str  # in ProbeConfig, and the key of a command-line override
    yaml: str  # dotted path in the YAML file
    parse: Callable[[object], Any]
    env: tuple[str, ...] = ()  # the most specific first


def _otlp(suffix: str) -> tuple[str, str]:
    return f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"


# The protocol comes before the endpoint: the generic endpoint's meaning depends on it.
_SETTINGS = (
    _Setting(
        "otlp_protocol", "exporter.protocol", _choice("grpc", "http/protobuf"), _otlp("PROTOCOL")
    ),
    _Setting("otlp_endpoint", "exporter.endpoint", _text, _otlp("ENDPOINT")),
    _Setting("otlp_headers", "exporter.headers", _pairs, _otlp("HEADERS")),
    _Setting("otlp_timeout_ms", "exporter.timeout_ms", _int(1), _otlp("TIMEOUT")),
    _Setting(
        "otlp_compression", "exporter.compression", _choice("gzip", "none"), _otlp("COMPRESSION")
    ),
    _Setting("otlp_certificate", "exporter.certificate", _existing_file, _otlp("CERTIFICATE")),
    _Setting("otlp_insecure", "exporter.insecure", _bool, _otlp("INSECURE")),
    _Setting("resource_attributes", "resource_attributes", _pairs, ("OTEL_RESOURCE_ATTRIBUTES",)),
    _Setting("bsp_max_queue_size", "batch.max_queue_size", _int(1), ("OTEL_BSP_MAX_QUEUE_SIZE",)),
    _Setting(
        "bsp_max_queue_bytes", "batch.max_queue_bytes", _int(1024), ("PROBE_MAX_QUEUE_BYTES",)
    ),
    _Setting(
        "bsp_max_export_batch_size",
        "batch.max_export_batch_size",
        _int(1),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",),
    ),
    _Setting(
        "bsp_schedule_delay_ms", "batch.schedule_delay_ms", _int(0), ("OTEL_BSP_SCHEDULE_DELAY",)
    ),
    _Setting(
        "bsp_export_timeout_ms", "batch.export_timeout_ms", _int(1), ("OTEL_BSP_EXPORT_TIMEOUT",)
    ),
    _Setting("metrics_address", "metrics.address", _address, ("PROBE_METRICS_ADDRESS",)),
    _Setting(
        "health_threshold_s", "metrics.health_threshold_s", _seconds, ("PROBE_HEALTH_THRESHOLD",)
    ),
    _Setting("log_format", "log_format", _choice("text", "json"), ("PROBE_LOG_FORMAT",)),
    _Setting("nice", "nice", _int(0, 19), ("PROBE_NICE",)),
    _Setting("capture_size", "capture.size", _int(1), ("PROBE_CAPTURE_SIZE",)),
    _Setting(
        "max_exchange_rate", "capture.max_exchange_rate", _int(0), ("PROBE_MAX_EXCHANGE_RATE",)
    ),
    _Setting(
        "min_exchange_rate", "capture.min_exchange_rate", _int(1), ("PROBE_MIN_EXCHANGE_RATE",)
    ),
    _Setting(
        "cpu_pressure_limit",
        "capture.cpu_pressure_limit",
        _share,
        ("PROBE_CPU_PRESSURE_LIMIT",),
    ),
    _Setting("capture_credentials", "capture.credentials", _bool, ("PROBE_CAPTURE_CREDENTIALS",)),
    _Setting("redact_query", "capture.redact_query", _bool, ("PROBE_REDACT_QUERY",)),
    _Setting(
        "header_allowlist",
        "capture.header_allowlist",
        _many(_header_name),
        ("PROBE_HEADER_ALLOWLIST",),
    ),
    _Setting("pids", "filters.pids", _many(_int(1)), ("PROBE_PIDS",)),
    _Setting("ports", "filters.ports", _many(_int(1, 65535)), ("PROBE_PORTS",)),
    _Setting("comm_patterns", "filters.comm", _many(_text), ("PROBE_COMM",)),
    _Setting(
        "exclude_comm_patterns", "filters.exclude_comm", _many(_text), ("PROBE_EXCLUDE_COMM",)
    ),
    _Setting("exe_patterns", "filters.exe", _many(_text), ("PROBE_EXE",)),
    _Setting("container_ids", "filters.containers", _many(_text), ("PROBE_CONTAINERS",)),
)
assert {s.field for s in _SETTINGS} == {f.name for f in fields(ProbeConfig)}


def load(
    args_overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> ProbeConfig:
    """Resolve every setting from flags, then ``environ``, then the YAML file, then defaults."""
    args = {k: v for k, v in (args_overrides or {}).items() if v is not None}
    unknown = set(args) - {s.field for s in _SETTINGS}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    env = os.environ if environ is None else environ
    from_file = _read_file(config_path) if config_path else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in _SETTINGS:
        found = _lookup(setting, args, env, from_file, config_path)
        if found is None:
            continue
        raw, source = found
        try:
            value = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
        protocol = values.get("otlp_protocol", DEFAULT_PROTOCOL)
        if source == _GENERIC_ENDPOINT and protocol == "http/protobuf":
            value = value.rstrip("/") + "/v1/traces"
        values[setting.field] = value
        sources[setting.field] = source
    config = replace(ProbeConfig(), **values)
    return _check(config, sources)


def _lookup(
    setting: _Setting,
    args: Mapping[str, Any],
    env: Mapping[str, str],
    from_file: Mapping[str, Any],
    config_path: str | None,
) -> tuple[Any, str] | None:
    """The raw value of the highest layer that has one, and a name for that source."""
    if setting.field in args:
        return args[setting.field], f"command-line setting {setting.field}"
    for name in setting.env:
        if env.get(name, "").strip():
            return env[name], name
    if setting.yaml in from_file:
        return from_file[setting.yaml], f"{config_path}: {setting.yaml}"
    return None


def _read_file(path: str) -> dict[str, Any]:
    """The YAML file's settings by dotted key; unknown keys are errors, to catch typos."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top")
    known = {s.yaml for s in _SETTINGS}
    flat: dict[str, Any] = {}
    _flatten(document, "", known, flat, path)
    return flat


def _flatten(node: dict, prefix: str, known: set[str], out: dict[str, Any], path: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if dotted in known:
            out[dotted] = value
        elif isinstance(value, dict) and any(k.startswith(dotted + ".") for k in known):
            _flatten(value, dotted + ".", known, out, path)
        else:
            raise ConfigError(f"config file {path}: unknown setting {dotted!r}")


def _check(config: ProbeConfig, sources: Mapping[str, str]) -> ProbeConfig:
    """Rules that involve more than one setting; fills the protocol's default endpoint."""

    def source(name: str) -> str:
        return sources.get(name, f"default {name}")

    if "otlp_endpoint" not in sources and config.otlp_protocol == "grpc":
        config = replace(config, otlp_endpoint=DEFAULT_GRPC_ENDPOINT)
    endpoint = config.otlp_endpoint
    url = urlsplit(endpoint) if "://" in endpoint else None
    needs_url = config.otlp_protocol == "http/protobuf" or url is not None
    if needs_url and (url is None or url.scheme not in ("http", "https") or not url.hostname):
        raise ConfigError(f"{source('otlp_endpoint')}: expected an http(s) URL, got {endpoint!r}")
    if config.bsp_max_export_batch_size > config.bsp_max_queue_size:
        raise ConfigError(
            f"{source('bsp_max_export_batch_size')}: must not exceed the queue size "
            f"({config.bsp_max_queue_size}, {source('bsp_max_queue_size')})"
        )
    return config
