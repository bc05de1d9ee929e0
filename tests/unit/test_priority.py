"""`probe run`'s CPU priority (`lower_priority` in probe/commands/run.py), each
case in a child process of its own: it lowers the priority of the process that
calls it, and what it does to the session's group depends on whether that
process leads its session. The group's file is a stand-in here;
tests/daemon/test_run.py checks the kernel's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def lowered(group: Path, new_session: bool) -> str:
    """What lower_priority(7) says, called in a child that leads a session of
    its own or shares this one."""
    code = (
        "from pathlib import Path; from probe.commands.run import lower_priority; "
        f"print(lower_priority(7, Path({str(group)!r})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        start_new_session=new_session,
    )
    return child.stdout.strip()


def test_a_session_leader_gives_its_group_the_nice(tmp_path):
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-12 nice 0\n")
    assert (
        lowered(group, new_session=True) == "CPU priority: nice 7, for its threads and its session"
    )
    assert group.read_text() == "7"


def test_a_probe_in_anothers_session_leaves_the_group_alone_and_says_so(tmp_path):
    group = tmp_path / "autogroup"
    group.write_text("untouched")
    said = lowered(group, new_session=False)
    assert said.startswith("CPU priority: nice 7 for its threads, which orders them only among")
    assert group.read_text() == "untouched"


def test_without_autogroups_only_threads_are_lowered(tmp_path):
    assert lowered(tmp_path / "absent", new_session=True) == "CPU priority: nice 7"


def test_a_group_that_cannot_be_set_is_reported(tmp_path):
    said = lowered(tmp_path, new_session=True)  # a directory: the write fails
    assert said == (
        f"CPU priority: nice 7 for its threads; its session's: [Errno 21] Is a directory: "
        f"'{tmp_path}'"
    )


def test_the_root_group_is_left_alone_and_said_so(tmp_path):
    group = tmp_path / "autogroup"
    group.write_text("")  # what the kernel shows for init's session
    said = lowered(group, new_session=True)
    assert said == (
        "CPU priority: nice 7 for its threads; its session's: the root scheduling group,"
        " left as it was"
    )
    assert group.read_text() == ""
