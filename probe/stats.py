"""The probe's own counters, shared by every stage and reported by the commands.

Each stage increments the counters it owns; nothing here is thread-safe by
design, because all stages run on the thread that polls the ring buffer.
"""

from __future__ import annotations


class Stats(dict[str, int]):
    """Named counters: ``stats["events"] += 1``; missing names read as 0.

    A dict with ``__missing__``, not a `collections.Counter`: Counter's own
    ``__delitem__`` makes Python route every item assignment through a lookup
    and call of ``__setitem__`` (five times a dict's instructions), and the hot
    path counts a few things a request."""

    def __missing__(self, name: str) -> int:
        return 0

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.items()))
