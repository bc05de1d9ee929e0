#!/usr/bin/env python3
"""Compile probe's hot path with mypyc: `make compile` (and `make setup`) run it.

Builds the modules listed in probe.compiled.MODULES into C extensions beside
their sources, as one group whose shared library lives in the package
(probe/hotpath__mypyc.*.so), then records the sha256 of each source it
compiled in probe/compiled.json; probe runs the extensions only while every
source still matches (probe.compiled).

Does nothing when the build is current. If the build fails (no C compiler,
no Python headers, a module that no longer type-checks), it removes what it
made and exits 1: probe still works, from source, at about twice the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["PROBE_PURE"] = "1"  # this process imports probe, and never needs the extensions
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from probe import compiled  # noqa: E402

GROUP = "probe.hotpath"  # the shared library: probe/hotpath__mypyc.*.so


def clean() -> None:
    for path in compiled.extension_files():  # this build's, and any earlier one's
        path.unlink()
    compiled.MANIFEST.unlink(missing_ok=True)


def build() -> None:
    # Imported here: mypy and setuptools are needed to build, never to run.
    from mypyc.build import mypycify
    from setuptools import setup

    with tempfile.TemporaryDirectory(prefix="probe-mypyc-") as scratch:
        extensions = mypycify(
            ["--config-file", str(REPO / "pyproject.toml"), *compiled.source_files()],
            opt_level="3",
            group_name=GROUP,
            target_dir=str(Path(scratch) / "c"),
        )
        setup(
            name="probe-hotpath",
            ext_modules=extensions,
            script_args=["-q", "build_ext", "--inplace", "--build-temp", str(Path(scratch) / "o")],
        )


def main() -> int:
    os.chdir(REPO)  # mypyc names modules by their paths from here
    if compiled.stale_modules() == []:
        print("compile: the hot path is already built from these sources", file=sys.stderr)
        return 0
    digests = {m: compiled.source_digest(m) for m in compiled.MODULES}  # what is built
    clean()
    print(f"compile: building {len(compiled.MODULES)} modules with mypyc", file=sys.stderr)
    try:
        build()
    except (Exception, SystemExit) as error:  # setuptools exits on a compiler error
        clean()
        shutil.rmtree(REPO / "build", ignore_errors=True)
        print(f"compile: FAILED ({error}); probe runs from source", file=sys.stderr)
        return 1
    compiled.MANIFEST.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print("compile: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
