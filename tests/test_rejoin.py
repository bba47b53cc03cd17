"""Re-join rules: where to ask the upstream from, what of its answer to drop, when to say a gap."""

from __future__ import annotations

import orjson

from gateway.eventlog import StreamMeta
from gateway.rejoin import Seam, begins_partway, leg_last_event_id, resume_point
from gateway.sse import Event, event
from gateway.agentapi import Cursor


def ev(uid: str | None, body: str, name: str = "custom") -> Event:
    return event(f"event: {name}\ndata: {body}\n".encode(), uid)


def test_resume_point_is_just_before_and_sorts_before_as_a_string() -> None:
    assert resume_point(None) is None
    assert resume_point("1795399133432-0") == "1795399133431-0"
    assert resume_point("1000-0") == "0999-0" and "0999-0" < "1000-0"
    assert resume_point("10-3") == "09-0"
    assert resume_point("0-5") == "0"
    assert resume_point("opaque") == "opaque"


def test_one_rule_for_the_upstream_last_event_id() -> None:
    held = StreamMeta(key="k", kind="run", upstream="u", path="/p", head=5, last_upstream_id="1000-0")
    assert leg_last_event_id("run", held) == "0999-0"
    assert leg_last_event_id("run", StreamMeta(key="k", kind="run", upstream="u", path="/p")) == "-1"
    # A thread stream held from its start with nothing in it: all the upstream replays is new; one
    # begun at its live tail, or holding events without upstream ids, goes on from the live tail.
    assert leg_last_event_id("thread", StreamMeta(key="k", kind="thread", upstream="u", path="/p")) == "-"
    assert leg_last_event_id("thread", StreamMeta(key="k", kind="thread", upstream="u", path="/p",
                                                  begun_partway=True)) is None
    assert leg_last_event_id("thread", StreamMeta(key="k", kind="thread", upstream="u", path="/p", head=3)) is None
    assert leg_last_event_id("run", None, Cursor("seq", 7, "7")) == "-1"
    assert leg_last_event_id("thread", None, Cursor("start", 0, "-1")) == "-"
    assert leg_last_event_id("run", None, Cursor("upstream", 0, "5-0")) == "5-0"
    assert leg_last_event_id("run", None, Cursor("none")) is None


def test_a_stream_first_captured_from_anywhere_but_its_start_begins_partway() -> None:
    for kind in ("run", "thread"):
        held = StreamMeta(key="t", kind=kind, upstream="u", path="/p")
        for cursor in (Cursor("none"), Cursor("upstream", 0, "1795-0")):
            assert begins_partway(kind, None, leg_last_event_id(kind, None, cursor))
        for cursor in (Cursor("start", 0, "-1"), Cursor("seq", 7, "7")):  # a run's first event held says it
            assert begins_partway(kind, None, leg_last_event_id(kind, None, cursor)) == (kind == "run")
        assert not begins_partway(kind, held, None)  # a later leg: the first one said
    assert not begins_partway("session", None, None)  # its upstream replays the thread on every leg


def test_events_already_held_are_dropped() -> None:
    d = Seam([("5-0", b"event: custom\ndata: a\n"), ("5-0", b"event: custom\ndata: t\n")])
    got = d.filter([ev("5-0", "a"), ev("5-0", "t"), ev("5-0", "t"), ev("6-0", "b")])
    assert [(uid, body) for body, uid in got] == [("6-0", b"event: custom\ndata: b\n")]


def test_identical_bodies_under_rising_ids_are_all_kept() -> None:
    d = Seam([])
    same = [ev("7-0", "the"), ev("8-0", "the"), ev("9-0", "the")]
    assert len(d.filter(same)) == 3


def test_identical_id_and_body_on_a_rejoined_leg_count_once() -> None:
    # The documented limit: with ids that repeat within a millisecond, the wire cannot tell a
    # second identical event from the re-send every re-join makes, so a seam keeps one.
    d = Seam([])
    assert len(d.filter([ev("7-0", "the"), ev("7-0", "the")])) == 1


def test_identical_events_in_one_millisecond_past_the_seam_are_all_kept() -> None:
    """The in-memory runtime gives every event of a millisecond the same id: a token streamed twice in
    one millisecond is two events with the same id and body. The upstream re-sends what it replays
    once, at the join; a seam that took every later repeat for a re-send dropped them for the rest
    of the leg (a re-joined run lost every doubled token from then on)."""
    d = Seam([("5-0", b"event: custom\ndata: a\n")], after=3, expect="held")
    assert d.filter([ev("5-0", "a"), ev("5-0", "a")]) == []  # the replay of a, and its re-send
    later = [ev("7-0", "the"), ev("7-0", "the"), ev("8-0", "x"), ev("9-0", "y"), ev("9-0", "y"), ev("9-0", "y")]
    assert d.filter(later) == later
    # Two a's held: the replay re-sends both, and a third one in that millisecond is new.
    d = Seam([("5-0", b"event: custom\ndata: a\n")] * 2, after=3, expect="held")
    assert d.filter([ev("5-0", "a"), ev("5-0", "a")]) == []
    assert d.filter([ev("6-0", "b"), ev("6-0", "b")]) == [ev("6-0", "b")]  # the documented limit, once
    assert d.filter([ev("6-0", "b"), ev("7-0", "c")]) == [ev("6-0", "b"), ev("7-0", "c")]


def test_a_re_sent_run_of_the_replay_is_dropped_even_in_one_millisecond() -> None:
    # The live queue re-sends the tail of the replay (what was published while it was read): with
    # every id the same, it is told by its order, which repeats the replay's.
    d = Seam([])
    first = [ev("7-0", f"i{i}") for i in range(6)]
    assert d.filter(first) == first
    assert d.filter([ev("7-0", "i3"), ev("7-0", "i4"), ev("7-0", "i5")]) == []
    assert d.filter([ev("7-0", "i6"), ev("7-0", "i6")]) == [ev("7-0", "i6"), ev("7-0", "i6")]


def test_replay_live_overlap_jumping_back_is_dropped() -> None:
    d = Seam([])
    first = [ev(f"{i}-0", f"i{i}") for i in range(10, 20)]
    again = [ev(f"{i}-0", f"i{i}") for i in range(15, 20)]  # the live queue re-sends 15..19
    later = [ev("20-0", "i20")]
    assert d.filter(first) == first
    assert d.filter(again) == []
    assert d.filter(later) == later


def test_a_leg_starting_with_a_held_event_is_proven_and_unmarked() -> None:
    d = Seam([("5-0", b"event: custom\ndata: a\n")], after=40, expect="held")
    assert d.filter([ev("5-0", "a"), ev("6-0", "b")]) == [ev("6-0", "b")]
    assert d.close() == [] and d.gap is None


def test_a_leg_starting_elsewhere_is_marked_once_at_the_seam() -> None:
    d = Seam([("5-0", b"event: custom\ndata: a\n")], after=40, expect="held")
    got = d.filter([ev("9-0", "z"), ev("10-0", "y")])
    assert [orjson.loads(body.split(b"data: ")[1]) ["reason"] for body, _ in got[:1]] == ["replay_mismatch"]
    assert got[0][0].startswith(b"event: gap\n") and got[1:] == [ev("9-0", "z"), ev("10-0", "y")]
    assert orjson.loads(got[0][0].split(b"data: ")[1])["after"] == "40"
    assert d.filter([ev("11-0", "x")]) == [ev("11-0", "x")] and d.gap == "replay_mismatch"


def test_no_ids_cannot_be_proven() -> None:
    d = Seam([(None, b"event: custom\ndata: a\n")], after=3, expect="held")
    got = d.filter([ev(None, "b")])
    assert got[0][0].startswith(b"event: gap\n") and d.gap == "no_upstream_ids"


def test_an_empty_rejoin_is_marked_when_it_ends() -> None:
    d = Seam([("5-0", b"event: custom\ndata: a\n")], after=3, expect="held")
    assert d.filter([]) == []
    assert d.close()[0][0].startswith(b"event: gap\n") and d.gap == "empty_rejoin"


def test_a_run_with_nothing_held_must_restart_from_its_metadata() -> None:
    ok = Seam([], expect="start")
    assert ok.filter([ev("1-0", "{}", "metadata")]) == [ev("1-0", "{}", "metadata")]
    late = Seam([], expect="start")
    assert late.filter([ev(None, "{\"i\":4}")])[0][0].startswith(b"event: gap\n")
