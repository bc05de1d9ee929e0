"""The compiled hot path: when its extensions may run, and that they do."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

from probe import compiled
from probe.export.batch import _Entry
from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    Role,
    conn_key,
    endpoint,
)
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest, HttpResponse
from probe.trace.linker import _Context
from probe.trace.span import Resource, Span, SpanKind

REPO = Path(__file__).resolve().parents[2]
ONE = ("probe.protocol.http1",)


def loaded_from(module: str, **env: str) -> str:
    """The file a fresh interpreter imports ``module`` from."""
    code = f"import {module} as m; print(m.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_no_manifest_means_not_built(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    status = compiled.built_status(ONE, tmp_path / "compiled.json")
    assert not status.compiled
    assert "not built" in status.reason


def test_a_source_edited_since_the_build_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    manifest = tmp_path / "compiled.json"
    digests = {m: compiled.source_digest(m) for m in compiled.MODULES}
    digests["probe.trace.linker"] = "0" * 64
    manifest.write_text(json.dumps(digests))
    status = compiled.built_status(compiled.MODULES, manifest)
    assert not status.compiled
    assert "probe.trace.linker" in status.reason
    assert "probe.protocol.http1" not in status.reason


def test_a_module_built_once_but_no_longer_listed_is_stale(tmp_path: Path, monkeypatch) -> None:
    """Its extension would still be imported: the build must be redone."""
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    manifest = tmp_path / "compiled.json"
    dropped = "probe.kernel.loader"
    manifest.write_text(json.dumps({m: compiled.source_digest(m) for m in (*ONE, dropped)}))
    assert compiled.stale_modules(ONE, manifest) == [dropped]


def test_pure_wins_over_a_current_build(tmp_path: Path, monkeypatch) -> None:
    manifest = tmp_path / "compiled.json"
    manifest.write_text(json.dumps({m: compiled.source_digest(m) for m in ONE}))
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    assert compiled.built_status(ONE, manifest).reason == "PROBE_PURE is set"


def test_source_finder_finds_sources_of_listed_modules_only() -> None:
    finder = compiled._SourceFinder(ONE)
    spec = finder.find_spec("probe.protocol.http1")
    assert spec is not None and spec.origin == str(compiled.source_path(ONE[0]))
    assert finder.find_spec("probe.protocol.connection") is None


def test_pure_runs_every_module_from_source() -> None:
    for module in ("probe.protocol.http1", "probe.pipeline"):
        assert loaded_from(module, PROBE_PURE="1").endswith(".py")


def test_the_hot_path_runs_as_built() -> None:
    """make setup compiles it: a build that failed or went stale fails here.
    make test also runs the unit tests with PROBE_PURE=1: then from source."""
    status = compiled.running_status()
    if os.environ.get(compiled.PURE_ENV):
        assert not status.compiled
        assert loaded_from("probe.protocol.http1", PROBE_PURE="1").endswith(".py")
    else:
        assert status.compiled, str(status)
        assert loaded_from("probe.protocol.http1").endswith(".so")


# Built once per record, message, exchange, span or queued span; their
# constructors are written out so that mypyc compiles them (probe/compiled.py).
PER_RECORD_CLASSES = (
    DataEvent, ConnOpen, ConnClose, ConnectionInfo,
    HttpRequest, HttpResponse, HttpExchange, Span, _Context, _Entry,
)  # fmt: skip


def test_per_record_constructors_are_compiled_with_the_hot_path() -> None:
    """A constructor left to @dataclass would run interpreted even when compiled."""
    runs_compiled = compiled.running_status().compiled
    for cls in PER_RECORD_CLASSES:
        interpreted = isinstance(cls.__init__, types.FunctionType)
        assert interpreted != runs_compiled, f"{cls.__name__}.__init__"


def test_written_out_constructors_set_every_field_to_its_declared_default() -> None:
    """The fields keep their declared defaults (mypyc then knows the attributes
    are always set, which measured faster); a written-out __init__ must agree."""
    key = ConnKey(1, 3, 7)
    request = HttpRequest("1.1", [], 1, 2, 9)
    response = HttpResponse("1.1", [], 3, 4, 9)
    made = [
        DataEvent(key, 9, 1, 2, Direction.EGRESS, 5, b"GET /"),
        ConnOpen(key, 9, 1, Role.SERVER, None, None),
        ConnClose(key, 9, 1),
        ConnectionInfo(key, Role.SERVER, None, None),
        request,
        response,
        HttpExchange(ConnectionInfo(key, Role.SERVER, None, None), request, response),
        Span("GET", SpanKind.SERVER, 1, 2, Resource({})),
        _Context((key, 0), Role.SERVER, 1),
    ]
    for obj in made:
        for field in dataclasses.fields(obj):
            where = f"{type(obj).__name__}.{field.name}"
            value = getattr(obj, field.name)  # AttributeError: never set
            if field.default is not dataclasses.MISSING:
                assert value == field.default, where
            elif field.default_factory is not dataclasses.MISSING:
                fresh = field.default_factory()
                if isinstance(fresh, bytes):  # a new random id: its kind, not its value
                    assert isinstance(value, bytes) and len(value) == len(fresh) and any(value)
                else:
                    assert value == fresh, where
        if type(obj) is not _Context:  # eq=False there: identity
            assert obj == dataclasses.replace(obj)  # eq and replace still work


def test_keys_and_endpoints_built_in_c_are_the_named_tuples() -> None:
    for built, named in (
        (conn_key(1, 3, 7), ConnKey(1, 3, 7)),
        (endpoint("::1", 80), Endpoint("::1", 80)),
    ):
        assert type(built) is type(named) and built == named and hash(built) == hash(named)
    assert (conn_key(1, 3, 7).fd, endpoint("::1", 80).port) == (3, 80)
