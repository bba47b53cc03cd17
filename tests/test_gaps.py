"""Upstream legs that break and are re-joined: exact where the upstream lets the gateway prove it,
an in-band gap marker everywhere else, never a silent loss and never a duplicate.

The fake upstream plays the servers users really run: one that ignores
``stream_resumable`` (no ids, a join gets the live tail), one whose replay buffer
has expired, and, by default, the real server's habit of re-sending the last
replayed event as the first live one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp
import pytest

from gateway.rejoin import Seam
from gateway.sse import event
from tests.conftest import RunningGateway, gateway_config
from tests.fake_upstream import FakeAgentServer
from tests.support.sse import Ev, read_events
from tests.support.runs import assert_ids_increase, customs, join, new_thread, stream_run

MakeGateway = Callable[..., Awaitable[RunningGateway]]


def gaps(events: list[Ev]) -> list[Ev]:
    return [e for e in events if e.event == "gap"]


def assert_gap_marked_at_every_seam(got: list[Ev], n: int, seams: int) -> None:
    """Each stretch between gap markers is contiguous; what is missing lies exactly at a marker."""
    assert len(gaps(got)) == seams, [e.event for e in got]
    stretches: list[list[int]] = [[]]
    for e in got:
        if e.event == "gap":
            stretches.append([])
        elif e.event == "custom":
            stretches[-1].append(e.json["i"])
    flat = [i for s in stretches for i in s]
    assert flat == sorted(flat) and len(set(flat)) == len(flat), "no duplicate, no reordering"
    for s in stretches:
        assert s == list(range(s[0], s[0] + len(s))) if s else True, "no loss inside a stretch"
    assert flat[-1] == n - 1, "the live tail reaches the end of the run"
    for i, e in enumerate(got):
        if e.event != "gap":
            continue
        assert e.id is not None
        doc = e.json
        # README: after is the id of the last event before the gap (null at the very start), as a string.
        assert isinstance(doc, dict) and doc["after"] == (got[i - 1].id if i else None), (doc, got[i - 1 : i + 1])
        assert doc["reason"] in ("no_upstream_ids", "replay_mismatch", "empty_rejoin") and doc["message"]


async def make_fake_gateway(make_gateway: MakeGateway, fake: FakeAgentServer, tmp_path: Path,
                            **streams: object) -> RunningGateway:
    cfg = {"reattach_backoff": "50ms", **streams}
    return await make_gateway(gateway_config(tmp_path, {"default": {"urls": [fake.url]}}, streams=cfg))


@pytest.mark.parametrize("k", [3, 12])
async def test_leg_reset_on_an_upstream_without_ids_is_marked_in_band(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        k: int) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.ignore_resumable = True  # no ids, a join is the live tail only
    fake_upstream.faults.cut_after = k
    n = 80
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, delay=0.01)
    got = await read_events(resp)
    assert_gap_marked_at_every_seam(got, n, seams=1)
    assert customs(got)[0] == 0, "what came before the reset is intact"
    assert_ids_increase(got)
    # The marker is in the log like any other event: a replay shows it in the same place, same id.
    assert await join(http, gw.url + resp.headers["Location"], "-1") == got
    assert gw.gw.metrics.gaps.labels("no_upstream_ids")._value.get() == 1


async def test_three_resets_in_one_run_give_three_markers(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cuts = [3, 6, 6]
    fake_upstream.faults.cut_mid_event = True  # each reset lands inside an event
    n = 150
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, delay=0.01)
    got = await read_events(resp)
    assert_gap_marked_at_every_seam(got, n, seams=3)
    assert await join(http, gw.url + resp.headers["Location"], "-1") == got


async def test_expired_replay_buffer_is_marked(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.replay_expired = True  # ids, but a re-join replays nothing
    fake_upstream.faults.cut_after = 5
    n = 80
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, delay=0.01)
    got = await read_events(resp)
    assert_gap_marked_at_every_seam(got, n, seams=1)
    assert gaps(got)[0].json["reason"] == "replay_mismatch"


async def test_run_that_ended_while_the_leg_was_down_is_marked_then_ends(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path, reattach_backoff="300ms")
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cut_after = 4
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=30, delay=0.001)  # over before the re-join
    got = await read_events(resp)
    assert got[-1].event == "gap", "the re-join got nothing: the end is not proof that nothing was lost"
    assert got[-1].json["reason"] == "empty_rejoin"


async def test_provable_rejoin_has_no_marker_and_no_duplicate(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.faults.cuts = [5, 9, 2]  # resumable, with the real server's re-send on every join
    n = 80
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=n, delay=0.01)
    got = await read_events(resp)
    assert not gaps(got)
    assert customs(got) == list(range(n))
    assert_ids_increase(got)


@pytest.mark.parametrize("cut", [3, 6, 7, 10])
async def test_a_token_sent_twice_in_one_millisecond_survives_a_rejoin(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession,
        cut: int) -> None:
    """On the in-memory runtime every event of a millisecond has the same id, so a token streamed
    twice is two events with the same id and body. After a re-join the seam took every such second
    event for a re-send of the first and dropped it, for the rest of the run."""
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path, reattach_backoff="10ms")
    fake_upstream.behaviour.ms_ids = True  # with the real server's re-send of the last replayed event
    fake_upstream.faults.cuts = [cut]
    n = 12
    tid = await new_thread(http, gw)
    async with http.post(f"{gw.url}/threads/{tid}/runs/stream",
                         json={"assistant_id": "a", "input": {"n": n, "delay": 0.05, "repeat": 2}}) as resp:
        loc = resp.headers["Location"]
        got = await read_events(resp)
    twice = [i for i in range(n) for _ in range(2)]
    assert not gaps(got)
    assert customs(got) == twice
    assert customs(await join(http, gw.url + loc, "-1")) == twice


def test_rejoin_resending_its_last_replayed_event_is_deduplicated() -> None:
    b = [f"event: custom\ndata: {i}\n".encode() for i in range(4)]
    d = Seam([("100-0", b[0])])
    first = d.filter([event(b[0], "100-0"), event(b[1], "101-0"), event(b[2], "102-0")])
    second = d.filter([event(b[2], "102-0"), event(b[3], "103-0")])
    assert [body for body, _ in first + second] == [b[1], b[2], b[3]]


async def test_gap_marker_passes_every_stream_mode_filter(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cut_after = 3
    tid = await new_thread(http, gw)
    resp = await stream_run(http, gw, tid, n=40, delay=0.01)
    await read_events(resp)
    only_custom = await join(http, gw.url + resp.headers["Location"], "-1", stream_mode="custom")
    assert len(gaps(only_custom)) == 1
    await asyncio.sleep(0)


# --- what the official clients make of a gap marker ---------------------------------------------------

async def test_python_sdk_sees_the_marker_as_neither_output_end_nor_failure(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path) -> None:
    from langgraph_sdk import get_client

    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cut_after = 3
    client = get_client(url=gw.url, api_key=None)
    try:
        tid = (await client.threads.create())["thread_id"]
        parts = [p async for p in client.runs.stream(tid, "ticker", input={"n": 60, "delay": 0.01},
                                                      stream_mode=["custom"])]
    finally:
        await client.http.client.aclose()
    names = [p.event for p in parts]
    assert names.count("gap") == 1, names
    assert names[-1] == "custom" and parts[-1].data == {"i": 59, "of": 60}, "the stream went on to the run's end"
    assert "error" not in names and "end" not in names


# 2.0.0 was pinned first (npm marks it deprecated); 1.15.0 is what `npm install` gives (latest tag).
@pytest.mark.parametrize(("package", "version"), [("@langchain/langgraph-sdk", "2.0.0"),
                                                  ("@langchain/langgraph-sdk-latest", "1.15.0")],
                         ids=["sdk-2.0.0", "sdk-latest-1.15.0"])
async def test_js_sdk_and_the_usestream_manager_ignore_the_marker(
        make_gateway: MakeGateway, fake_upstream: FakeAgentServer, tmp_path: Path, package: str, version: str) -> None:
    import json
    import shutil
    import subprocess

    js_dir = Path(__file__).parent / "js"
    if shutil.which("node") is None or not (js_dir / "node_modules" / package).is_dir():
        pytest.skip("node or tests/js/node_modules is missing (tests/run.sh installs them)")
    gw = await make_fake_gateway(make_gateway, fake_upstream, tmp_path)
    fake_upstream.behaviour.ignore_resumable = True
    fake_upstream.faults.cuts = [3, -1, 3]  # the client's run leg, its re-join (uncut), the hook's run leg
    proc = await asyncio.create_subprocess_exec(
        "node", str(js_dir / "gap_stream.mjs"), gw.url, json.dumps({"n": 60, "delay": 0.01}), package, cwd=js_dir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert got["sdk"] == version, "the SDK version this case is for"
    names = [e for e, _ in got["client"]]
    assert got["client_error"] is None and names.count("gap") == 1
    assert got["client"][-1] == ["custom", {"i": 59, "of": 60}]
    hook = got["hook"]
    assert hook["error"] is None and hook["finished"], "the hook neither failed nor stopped early"
    assert hook["custom"][-1] == {"i": 59, "of": 60} and all("i" in c for c in hook["custom"]), \
        "the marker reached no output callback"
