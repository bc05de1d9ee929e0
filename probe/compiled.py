"""The hot path, compiled: which modules mypyc builds, and whether they run.

Every kernel record passes through decoding (and, for records other than
plain data, the books on connections), HTTP framing, request/response
pairing, span building, linking and OTLP encoding. Those modules are plain,
type-checked Python; ``scripts/compile.py`` (run by ``make setup``) compiles
them with mypyc into C extensions beside their sources, which halves the
probe's CPU per request. Python imports an extension before a source file
of the same name, so once built they are what runs.

Two guards, set up when ``probe`` is imported, make every module run from its
source instead:

- the extensions were built from other sources than the ones beside them
  (edited or checked out since the build): they would run stale code, so
  the sources run, with a warning to run ``make compile``;
- ``PROBE_PURE=1``: to compare the two, or to debug.

The modules are compiled as one group and call each other directly, so it
is all of them or none.

The classes built once per record, message, exchange or span write their
``__init__`` out, under ``@dataclass(init=False)``: mypyc compiles a written
``__init__``, while the one ``@dataclass`` generates is made at import time
and runs interpreted, at about half a microsecond per object. Their fields
keep their declared defaults too: without them mypyc cannot tell the
attributes are always set and checks them on every read (the replay of
kept-alive requests measured 4 % slower). tests/unit/test_compiled.py holds
the two to the same values.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent

# In the order data flows. Each must pass mypy; see scripts/compile.py.
MODULES = (
    "probe.stats",
    "probe.kernel.events",
    "probe.kernel.decode",
    "probe.kernel.registry",
    "probe.protocol.model",
    "probe.protocol.http1",
    "probe.protocol.connection",
    "probe.protocol.tracker",
    "probe.trace.clock",
    "probe.trace.resource",
    "probe.trace.span",
    "probe.trace.traceparent",
    "probe.trace.builder",
    "probe.trace.linker",
    "probe.export.batch",
    "probe.export.otlp_wire",
    "probe.pipeline",
)

# Written by scripts/compile.py after a build: the sha256 of each module's
# source it compiled.
MANIFEST = PACKAGE_DIR / "compiled.json"
PURE_ENV = "PROBE_PURE"


def source_path(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def source_files(modules: Sequence[str] = MODULES) -> list[str]:
    """The modules' sources, relative to the repository (for mypy and mypyc)."""
    return [str(source_path(m).relative_to(PACKAGE_DIR.parent)) for m in modules]


def source_digest(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Status:
    compiled: bool  # the modules run as C extensions
    reason: str  # why they do not, or what they are

    def __str__(self) -> str:
        return ("compiled: " if self.compiled else "interpreted: ") + self.reason


def _built(manifest: Path = MANIFEST) -> dict[str, str] | None:
    """What the last build compiled (module -> source sha256); None if nothing."""
    try:
        built = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    return built if isinstance(built, dict) else None


def stale_modules(modules: Sequence[str] = MODULES, manifest: Path = MANIFEST) -> list[str] | None:
    """The modules whose extension is missing or was built from another
    source, and those built once but no longer listed; None when there was
    no build at all."""
    built = _built(manifest)
    if built is None:
        return None
    stale = [m for m in modules if built.get(m) != source_digest(m) or not _extension(m)]
    return stale + sorted(set(built) - set(modules))


def built_status(modules: Sequence[str] = MODULES, manifest: Path = MANIFEST) -> Status:
    """Whether the extensions beside the sources may run, judged from files alone."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return Status(False, f"{PURE_ENV} is set")
    stale = stale_modules(modules, manifest)
    if stale is None:
        return Status(False, "not built (make compile builds it with mypyc)")
    if stale:
        return Status(
            False,
            f"the build is older than the sources of {', '.join(stale)} (run make compile)",
        )
    return Status(True, f"{len(modules)} modules built by mypyc")


def extension_files() -> list[Path]:
    """Every extension module in the package: probe has none but the compiled ones."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in PACKAGE_DIR.rglob("*") if p.name.endswith(suffixes))


def _extension(module: str) -> Path | None:
    """The extension module file beside a module's source, if one was built."""
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


class _SourceFinder:
    """Finds the listed modules' source files, ahead of their extensions."""

    def __init__(self, modules: Sequence[str]) -> None:
        self._modules = frozenset(modules)

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self._modules:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name))


def install_guard(modules: Sequence[str] = MODULES) -> Status:
    """Run every module from source unless the extensions may run. Call
    before any of them is imported (``probe/__init__.py`` does)."""
    status = built_status(modules)
    if not status.compiled:
        if extension_files() and os.environ.get(PURE_ENV, "") in ("", "0"):
            warnings.warn(f"probe's hot path is {status}", RuntimeWarning, stacklevel=2)
        # a module built once and since dropped from the list has an extension too
        sys.meta_path.insert(0, _SourceFinder([*modules, *(_built() or {})]))
    return status


def running_status(modules: Sequence[str] = MODULES) -> Status:
    """What actually runs: compiled only if every listed module loaded as an extension."""
    if not STATUS.compiled:
        return STATUS
    interpreted = [m for m in modules if not _is_extension(importlib.import_module(m))]
    if interpreted:
        return Status(False, f"built, but {', '.join(interpreted)} loaded from source")
    return STATUS


def _is_extension(module: ModuleType) -> bool:
    return str(getattr(module, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )


STATUS = install_guard()
