"""probe.kernel.memory: which mappings may be released (the release itself is
tested in tests/kernel/test_compiler_memory.py, where bcc has compiled)."""

from probe.kernel.memory import Mapping, mappings, releasable

SMAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1 /usr/bin/python3.11
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000400000 r-xp 00100000 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                4096 kB
Anonymous:             0 kB
7f0000400000-7f0000410000 r--p 00500000 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  64 kB
Anonymous:            64 kB
7f0000410000-7f0000411000 rw-p 00510000 08:01 2 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Anonymous:             0 kB
7f0001000000-7f0001200000 r-xp 00000000 08:01 3 /usr/lib/llvm-14/lib/libclang-cpp.so.14
Anonymous:             0 kB
7f0002000000-7f0002001000 rw-p 00000000 00:00 0
Anonymous:             4 kB
7f0003000000-7f0003100000 r-xp 00000000 08:01 4 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
Anonymous:             0 kB
7f0004000000-7f0004100000 r-xp 00000000 08:01 5 /opt/libclangd/helper.py
Anonymous:             0 kB
"""


def test_mappings_are_read_with_their_private_copies():
    found = mappings(SMAPS)
    assert len(found) == 8
    assert found[2] == Mapping(
        0x7F0000400000, 0x10000, "r--p", "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 64
    )
    assert found[5].path == ""


def test_only_clean_read_only_compiler_mappings_are_released():
    chosen = [m.start for m in mappings(SMAPS) if releasable(m)]
    # relocated data (private copies) and writable mappings stay
    assert chosen == [0x7F0000000000, 0x7F0001000000]
