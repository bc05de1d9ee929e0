"""ProbeConfig: layers, OpenTelemetry's variables, the YAML file, bad values."""

from __future__ import annotations

import pytest

from probe.commands.run import kernel_options
from probe.config import ConfigError, ProbeConfig, load
from probe.pipeline import POLL_MS


@pytest.fixture
def config_file(tmp_path):
    """Writes a YAML file and returns its path."""

    def write(text: str) -> str:
        path = tmp_path / "probe.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults():
    config = load({}, {}, None)
    assert config == ProbeConfig()
    assert config.otlp_endpoint == "http://localhost:4318/v1/traces"
    assert config.otlp_protocol == "http/protobuf"
    assert config.metrics_address == ("127.0.0.1", 9464)
    assert config.bsp_max_queue_size == 8192
    assert config.bsp_max_export_batch_size == 512
    assert config.bsp_schedule_delay_ms == 5000
    assert config.bsp_export_timeout_ms == 30_000
    assert config.capture_credentials is False
    assert config.redact_query is True
    assert config.max_exchange_rate == 10_000
    assert config.min_exchange_rate == 1_000
    assert config.cpu_pressure_limit == 0.1


def test_grpc_protocol_has_its_own_default_endpoint():
    config = load({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert config.otlp_endpoint == "http://localhost:4317"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http://c:4317",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://c:4318/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/base",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://c:4318/base/v1/traces",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9999/custom",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            },
            "http://c:9999/custom",  # used as is
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://c",
            },
            "https://c/v1/traces",
        ),
    ],
)
def test_endpoint_from_the_environment(environ, expected):
    assert load({}, environ).otlp_endpoint == expected


def test_traces_variables_win_over_generic_ones(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    generic = {
        "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent",
        "OTEL_EXPORTER_OTLP_INSECURE": "false",
    }
    traces = {
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "b=2",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(ca),
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "TRUE",
    }
    config = load({}, {**generic, **traces})
    assert config.otlp_headers == {"b": "2"}
    assert config.otlp_timeout_ms == 2500
    assert config.otlp_compression == "gzip"
    assert config.otlp_certificate == str(ca)
    assert config.otlp_insecure is True


def test_headers_and_resource_attributes_are_percent_decoded():
    config = load(
        {},
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b%3Dc , x-tenant=t1,",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=web%2Capi",
        },
    )
    assert config.otlp_headers == {"api-key": "a b=c", "x-tenant": "t1"}
    assert config.resource_attributes == {"deployment.environment": "prod", "team": "web,api"}


def test_batch_variables():
    config = load(
        {},
        {
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
            "OTEL_BSP_EXPORT_TIMEOUT": "3000",
        },
    )
    assert (
        config.bsp_max_queue_size,
        config.bsp_max_export_batch_size,
        config.bsp_schedule_delay_ms,
        config.bsp_export_timeout_ms,
    ) == (100, 10, 250, 3000)


FULL_FILE = """
exporter:
  endpoint: http://file:4318/v1/traces
  protocol: http/protobuf
  headers: {api-key: from-file}
  timeout_ms: 1234
  compression: gzip
  insecure: true
resource_attributes:
  deployment.environment: staging
batch:
  max_queue_size: 300
  max_queue_bytes: 65536
  max_export_batch_size: 30
  schedule_delay_ms: 100
  export_timeout_ms: 900
metrics:
  address: "[::1]:9999"
  health_threshold_s: 12.5
log_format: json
nice: 5
capture:
  size: 1024
  max_exchange_rate: 500
  min_exchange_rate: 50
  cpu_pressure_limit: 0.25
  credentials: true
  redact_query: false
  header_allowlist: [User-Agent, x-request-id]
filters:
  pids: [1, 22]
  ports: [80, 8080]
  comm: [nginx*]
  exclude_comm: [wrk, kube-probe*]
  exe: [/usr/bin/*, /opt/*]
"""


def test_every_setting_from_the_file(config_file):
    config = load({}, {}, config_file(FULL_FILE))
    assert config == ProbeConfig(
        otlp_endpoint="http://file:4318/v1/traces",
        otlp_protocol="http/protobuf",
        otlp_headers={"api-key": "from-file"},
        otlp_timeout_ms=1234,
        otlp_compression="gzip",
        otlp_insecure=True,
        resource_attributes={"deployment.environment": "staging"},
        bsp_max_queue_size=300,
        bsp_max_queue_bytes=65536,
        bsp_max_export_batch_size=30,
        bsp_schedule_delay_ms=100,
        bsp_export_timeout_ms=900,
        metrics_address=("::1", 9999),
        health_threshold_s=12.5,
        log_format="json",
        nice=5,
        capture_size=1024,
        max_exchange_rate=500,
        min_exchange_rate=50,
        cpu_pressure_limit=0.25,
        capture_credentials=True,
        redact_query=False,
        header_allowlist=("user-agent", "x-request-id"),
        pids=(1, 22),
        ports=(80, 8080),
        comm_patterns=("nginx*",),
        exclude_comm_patterns=("wrk", "kube-probe*"),
        exe_patterns=("/usr/bin/*", "/opt/*"),
    )


def test_flags_beat_environment_beat_file_beat_defaults(config_file):
    path = config_file(
        "exporter: {timeout_ms: 1, compression: gzip, headers: {a: file}}\ncapture: {size: 100}\n"
    )
    environ = {"OTEL_EXPORTER_OTLP_TIMEOUT": "2", "OTEL_EXPORTER_OTLP_HEADERS": "a=env"}
    flags = {"otlp_timeout_ms": 3, "capture_size": None}  # None: the flag was not given

    config = load(flags, environ, path)

    assert config.otlp_timeout_ms == 3  # flag
    assert config.otlp_headers == {"a": "env"}  # environment, whole
    assert config.otlp_compression == "gzip"  # file
    assert config.capture_size == 100  # file, the flag being None
    assert config.log_format == "text"  # default
    assert config.nice == 10  # default: below the workload's priority


def test_generic_endpoint_variable_beats_the_file(config_file):
    path = config_file("exporter: {endpoint: 'http://file:4318/v1/traces'}\n")
    config = load({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}, path)
    assert config.otlp_endpoint == "http://env:4318/v1/traces"
    flag = "http://flag:4318/v1/traces"
    assert load({"otlp_endpoint": flag}, {}, path).otlp_endpoint == flag


def test_flags_take_strings_or_typed_values():
    config = load({"pids": [3, 4], "ports": "80,443", "metrics_address": "0.0.0.0:9100"}, {})
    assert config.pids == (3, 4)
    assert config.ports == (80, 443)
    assert config.metrics_address == ("0.0.0.0", 9100)


def test_probe_variables():
    config = load(
        {},
        {
            "PROBE_METRICS_ADDRESS": "127.0.0.1:0",
            "PROBE_HEALTH_THRESHOLD": "5",
            "PROBE_PIDS": "10, 20",
            "PROBE_COMM": "curl,wget",
            "PROBE_EXCLUDE_COMM": "h2load, kube-probe*",
            "PROBE_HEADER_ALLOWLIST": "Accept",
            "PROBE_REDACT_QUERY": "false",
            "PROBE_MAX_EXCHANGE_RATE": "0",
            "PROBE_MIN_EXCHANGE_RATE": "20",
            "PROBE_CPU_PRESSURE_LIMIT": "0",
        },
    )
    assert config.metrics_address == ("127.0.0.1", 0)
    assert config.health_threshold_s == 5.0
    assert config.pids == (10, 20)
    assert config.comm_patterns == ("curl", "wget")
    assert config.exclude_comm_patterns == ("h2load", "kube-probe*")
    assert config.header_allowlist == ("accept",)
    assert config.redact_query is False
    assert config.max_exchange_rate == 0  # no limit
    assert config.min_exchange_rate == 20
    assert config.cpu_pressure_limit == 0  # the CPU never moves the limit


def test_empty_variables_are_ignored():
    assert (
        load({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "", "OTEL_BSP_MAX_QUEUE_SIZE": " "})
        == ProbeConfig()
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "many"},
            "OTEL_BSP_MAX_QUEUE_SIZE: expected an integer, got 'many'",
        ),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE: must be at least 1, got 0"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: expected one of grpc, http/protobuf",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "br"},
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION: expected one of gzip, none",
        ),
        (
            {"OTEL_EXPORTER_OTLP_INSECURE": "yes"},
            "OTEL_EXPORTER_OTLP_INSECURE: expected true or false, got 'yes'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_HEADERS": "a=1,b"},
            "OTEL_EXPORTER_OTLP_HEADERS: expected key=value, got 'b'",
        ),
        (
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/no/such.pem"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE: no such file: '/no/such.pem'",
        ),
        ({"PROBE_PORTS": "80,70000"}, "PROBE_PORTS: must be between 1 and 65535, got 70000"),
        ({"PROBE_NICE": "-5"}, "PROBE_NICE: must be between 0 and 19, got -5"),
        ({"PROBE_MAX_EXCHANGE_RATE": "-1"}, "PROBE_MAX_EXCHANGE_RATE: must be at least 0"),
        ({"PROBE_MIN_EXCHANGE_RATE": "0"}, "PROBE_MIN_EXCHANGE_RATE: must be at least 1"),
        ({"PROBE_CPU_PRESSURE_LIMIT": "1"}, "PROBE_CPU_PRESSURE_LIMIT: must be under 1, got '1'"),
        (
            {"PROBE_CPU_PRESSURE_LIMIT": "10%"},
            "PROBE_CPU_PRESSURE_LIMIT: expected a share, 0 to 1, got '10%'",
        ),
        (
            {"PROBE_METRICS_ADDRESS": "9464"},
            "PROBE_METRICS_ADDRESS: expected host:port, got '9464'",
        ),
        (
            {"PROBE_METRICS_ADDRESS": "::1:9464"},
            "PROBE_METRICS_ADDRESS: put an IPv6 address in brackets",
        ),
        ({"PROBE_HEALTH_THRESHOLD": "-1"}, "PROBE_HEALTH_THRESHOLD: must be at least 0, got '-1'"),
        (
            {"PROBE_HEADER_ALLOWLIST": "a b"},
            "PROBE_HEADER_ALLOWLIST: not an HTTP header name: 'a b'",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "c:4318",
            },
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: expected an http(s) URL, got 'c:4318'",
        ),
        (
            {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "11"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must not exceed the queue size"
            " (10, OTEL_BSP_MAX_QUEUE_SIZE)",
        ),
    ],
)
def test_bad_environment_values_name_the_variable(environ, message):
    with pytest.raises(ConfigError) as error:
        load({}, environ)
    assert str(error.value).startswith(message)


def test_bad_file_values_name_the_key(config_file):
    path = config_file("batch:\n  max_queue_size: lots\n")
    with pytest.raises(ConfigError) as error:
        load({}, {}, path)
    assert str(error.value) == f"{path}: batch.max_queue_size: expected an integer, got 'lots'"


def test_bad_flag_values_name_the_setting():
    with pytest.raises(ConfigError) as error:
        load({"capture_size": True}, {})
    assert str(error.value) == "command-line setting capture_size: expected an integer, got True"
    with pytest.raises(ConfigError, match="unknown setting\\(s\\): nope"):
        load({"nope": 1}, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("exporter:\n  endpiont: x\n", "unknown setting 'exporter.endpiont'"),
        ("colour: blue\n", "unknown setting 'colour'"),
        ("- a\n- b\n", "expected a mapping at the top"),
        ("exporter: [\n", "is not valid YAML"),
    ],
)
def test_bad_files(config_file, text, message):
    with pytest.raises(ConfigError, match=message):
        load({}, {}, config_file(text))


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read config file /no/such.yaml"):
        load({}, {}, "/no/such.yaml")


def test_empty_file_means_defaults(config_file):
    assert load({}, {}, config_file("")) == ProbeConfig()


def test_plain_process_names_are_filtered_in_the_kernel_globs_in_user_space():
    config = load({"comm_patterns": "nginx", "exclude_comm_patterns": "wrk,kube-probe*"}, {})
    options = kernel_options(config)
    assert options.comm == "nginx"
    assert options.excluded_comms == ("wrk",)
    assert "-DPROBE_EXCLUDE_COMMS" in options.cflags()
    assert "-DPROBE_EXCLUDE_COMMS" not in kernel_options(load({}, {})).cflags()


def test_the_default_queue_holds_a_poll_at_the_default_rate_limit():
    """A poll hands on every span the kernel's records made since the last
    one, in a burst, with a batch possibly in flight: at the default rate
    limit, the default queue drops none of them."""
    config = ProbeConfig()
    one_poll = config.max_exchange_rate * POLL_MS // 1000
    assert config.bsp_max_queue_size >= one_poll + config.bsp_max_export_batch_size
