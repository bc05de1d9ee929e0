"""bench.instructions: the run it counts plays the requests asked for, and the
per-request figure is the difference two runs' counts make."""

from __future__ import annotations

import pytest

from bench import instructions, replay


@pytest.mark.parametrize("pattern", instructions.PATTERNS)
def test_the_first_records_are_the_first_requests(pattern: str) -> None:
    assert len(replay.records(pattern, 7)) == replay.records_of(pattern, 7)
    instructions._play(pattern, 3, 6)  # raises unless 3 spans were exported


def test_a_play_that_loses_spans_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay, "records_of", lambda pattern, requests: 4 * requests - 2)
    with pytest.raises(SystemExit, match="3 spans for 4 requests"):
        instructions._play("close", 4, 4)  # the last response and close cut off


def test_callgrind_counts_are_read_and_differenced() -> None:
    stderr = "==123== Events    : Ir\n==123== Collected : 4200000\n==123==\n"
    assert instructions.parse_collected(stderr) == 4_200_000
    assert instructions.per_request(1_000_000, 4_200_000, 100) == 32_000
    with pytest.raises(ValueError, match="no 'Collected' line"):
        instructions.parse_collected("valgrind: command not found")
    with pytest.raises(ValueError, match="100 more requests counted 0"):
        instructions.per_request(5, 5, 100)
