"""Span and trace ids: unique, of their sizes, never all zero."""

from __future__ import annotations

import random

from probe.trace.span import UNSET_TRACE_ID, RandomIds, new_span_id, new_trace_id


def test_ids_drawn_across_many_pools_are_unique_and_sized() -> None:
    trace_ids = [new_trace_id() for _ in range(2000)]  # 32 KB: eight pools and more
    span_ids = [new_span_id() for _ in range(2000)]

    assert {len(each) for each in trace_ids} == {16} and {len(each) for each in span_ids} == {8}
    assert len(set(trace_ids)) == 2000 and len(set(span_ids)) == 2000


class ZerosFirst(random.Random):
    """A generator whose first draw is all zero bits."""

    def __init__(self) -> None:
        super().__init__(1)
        self.draws = 0

    def getrandbits(self, k: int) -> int:
        self.draws += 1
        return 0 if self.draws == 1 else super().getrandbits(k)


def test_an_all_zero_id_is_never_given() -> None:
    ids = RandomIds()
    ids.random = ZerosFirst()

    taken = ids.take(UNSET_TRACE_ID)

    assert taken != UNSET_TRACE_ID and len(taken) == 16
    assert ids.random.draws == 2  # the zero pool was passed over whole
