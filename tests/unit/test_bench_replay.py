"""bench.replay: the records it plays make one span per request, through the
probe's own reader, decoder, pipeline and encoder."""

from __future__ import annotations

import pytest

from bench import replay


@pytest.mark.parametrize(("pattern", "per_request"), [("keepalive", 2), ("close", 4)])
def test_every_request_played_makes_one_span(pattern: str, per_request: int) -> None:
    figures = replay.measure(pattern, requests=40, repeats=1)
    opens = 1 if pattern == "keepalive" else 0  # the one connection's OPEN
    assert figures["records"] == 40 * per_request + opens
    assert figures["requests"] == 40
    assert figures["pipeline_us_per_request"] > 0
    assert figures["encode_us_per_request"] > 0


def test_a_replay_that_loses_spans_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = replay.records("keepalive", 10)
    monkeypatch.setattr(replay, "records", lambda pattern, requests: recorded[:-2])
    with pytest.raises(SystemExit, match="9 spans for 10 requests"):
        replay.measure("keepalive", requests=10, repeats=1)
