"""The probe's own counters, shared by every stage and reported by the commands.

Each stage increments the counters it owns; nothing here is thread-safe by
design, because all stages run on the thread that polls the ring buffer.
"""

from __future__ import annotations

from collections import Counter


class Stats(Counter[str]):
    """Named counters: ``stats["events"] += 1``; missing names read as 0."""

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.items()))
