"""Re-join rules: where to ask the upstream from, and what of its answer to drop."""

from __future__ import annotations

from gateway.rejoin import Dedupe, resume_point
from gateway.sse import Event, event


def ev(uid: str, body: str) -> Event:
    return event(f"data: {body}\n".encode(), uid)


def test_resume_point_is_just_before_and_sorts_before_as_a_string() -> None:
    assert resume_point(None) is None
    assert resume_point("1795399133432-0") == "1795399133431-0"
    assert resume_point("1000-0") == "0999-0" and "0999-0" < "1000-0"
    assert resume_point("10-3") == "09-0"
    assert resume_point("0-5") == "0"
    assert resume_point("opaque") == "opaque"


def test_events_already_held_are_dropped_as_often_as_held_and_no_more() -> None:
    d = Dedupe([("5-0", b"data: a\n"), ("5-0", b"data: t\n"), ("5-0", b"data: t\n")])
    got = d.filter([ev("5-0", "a"), ev("5-0", "t"), ev("5-0", "t"), ev("5-0", "t"), ev("6-0", "b")])
    assert [(uid, body) for body, uid in got] == [("5-0", b"data: t\n"), ("6-0", b"data: b\n")]


def test_identical_events_in_one_millisecond_are_kept() -> None:
    d = Dedupe([])
    same = [ev("7-0", "the"), ev("7-0", "the"), ev("7-0", "the")]
    assert len(d.filter(same)) == 3


def test_replay_live_overlap_jumping_back_is_dropped() -> None:
    d = Dedupe([])
    first = [ev(f"{i}-0", f"i{i}") for i in range(10, 20)]
    again = [ev(f"{i}-0", f"i{i}") for i in range(15, 20)]  # the live queue re-sends 15..19
    later = [ev("20-0", "i20")]
    assert d.filter(first) == first
    assert d.filter(again[:-1]) == []  # 15..18 arrive behind 19: repeats
    assert d.filter(later) == later
