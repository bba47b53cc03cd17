"""Looking at a log from outside the serving path: what operators use when a user says "my chat
lost half an answer".

Each backend reads itself read-only (``LogView``, from ``gateway.eventlog.open_view``); what is
made of it lives here: one stream's details, the integrity check, the filters and JSON shape the
command line (``agent-gateway streams ...``, ``agent-gateway check``) and the admin listener
(``GET /streams``) share.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

from gateway.agentapi import keys_for
from gateway.eventlog import EventLog, LogView, StorageDamaged, StreamMeta
from gateway.marks import ERROR_EVENT, GAP_EVENT
from gateway.sse import event_name


def resolve(view: LogView, key_or_id: str, upstreams: list[str]) -> StreamMeta | None:
    """A stream by its key (``default/run/<id>``), or by a run or thread id under one of ``upstreams``:
    the rule the admin listener resolves by too (``agentapi.keys_for``)."""
    for key in keys_for(key_or_id, upstreams):
        if (meta := view.meta(key)) is not None:
            return meta
    return None


@dataclass
class Details:
    """What ``streams show`` says about one stream."""

    meta: dict[str, Any]
    events: int = 0
    first_event_at: float | None = None
    last_event_at: float | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)  # the gap markers: id and reason
    errors: list[dict[str, Any]] = field(default_factory=list)  # error events (a failed run, CaptureInterrupted)


def details(view: LogView, meta: StreamMeta) -> Details:
    out = Details(meta=public(meta))
    for seq, body, time_ms in stream_events(view, meta):
        t = time_ms / 1000
        out.first_event_at = t if out.first_event_at is None else out.first_event_at
        out.last_event_at = t
        out.events += 1
        name = event_name(body)
        if name in (GAP_EVENT, ERROR_EVENT):
            (out.gaps if name == GAP_EVENT else out.errors).append({"id": seq, **_data(body)})
    return out


Row = tuple[int, bytes, int]  # seq, body, unix ms of its record


def stream_events(view: LogView, meta: StreamMeta) -> list[Row]:
    """Every event a stream holds up to its head, checked whole as ``check`` checks it: a damaged
    log is StorageDamaged naming where it is read from, never a short answer."""
    rows: list[Row] = []
    found, _meta, _count = _check_stream(view, meta, rows)
    if found:
        raise StorageDamaged(found[0] if view.where in found[0] else f"{view.where}: {found[0]}")
    return rows


def public(meta: StreamMeta) -> dict[str, Any]:
    """A stream's metadata as tools show it: never the credential hash."""
    doc = asdict(meta)
    doc.pop("auth_salt", None)
    doc.pop("auth_digest", None)
    doc["state"] = state_of(meta)
    return doc


# One word for a stream's state, in the filters (--live/--finished, ?state=) and in every output;
# how a finished stream ended is its ``end`` (done, interrupted, or none for a released thread stream).
StreamState = Literal["live", "finished"]


def state_of(meta: StreamMeta) -> StreamState:
    return "live" if meta.open else "finished"


def state_named(text: str) -> StreamState | None:
    """A state as a filter names it (None: not one)."""
    return "live" if text == "live" else "finished" if text == "finished" else None


def _data(body: bytes) -> dict[str, Any]:
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                doc = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                return {}
            return doc if isinstance(doc, dict) else {}
    return {}


def event_record(seq: int, body: bytes, time_ms: int) -> dict[str, Any]:
    """One event as a JSON line of ``streams export``."""
    name = event_name(body).decode("utf-8", "replace")
    data = b"\n".join(line[6:] for line in body.split(b"\n") if line.startswith(b"data: "))
    return {"id": seq, "time": time_ms / 1000, "event": name, "data": data.decode("utf-8", "replace")}


def matches(meta: StreamMeta, *, state: StreamState | None, upstream: str | None, thread: str | None,
            older: float | None, newer: float | None, now: float | None = None) -> bool:
    """The filters of ``streams list`` (ages in seconds since the last update)."""
    now = time.time() if now is None else now
    age = now - meta.updated_at
    return ((state is None or state == state_of(meta))
            and (upstream is None or meta.upstream == upstream)
            and (thread is None or meta.thread_id == thread)
            and (older is None or age >= older)
            and (newer is None or age <= newer))


@dataclass
class CheckReport:
    """What ``check`` read, and every inconsistency it found (none: the log is sound)."""

    where: str
    streams: int = 0
    events: int = 0
    counter: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        found = (f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} found" if self.problems
                 else "no problem found")
        return (f"checked {self.streams} streams, {self.events} events and the id counter ({self.counter})"
                f" in {self.where}: {found}")


def check(view: LogView) -> CheckReport:
    """Every inconsistency in the log, one line each; StorageError when the log cannot be read
    far enough to check it (its stream list or its id counter).

    Sound beside a gateway that writes it: each stream's records are read up to the head its
    metadata had, a stream trimmed or removed meanwhile is read again, and the id counter is
    read last (it only grows, so every head read before it is at or below it).
    """
    report = CheckReport(view.where)
    held: list[StreamMeta] = []
    for meta in view.metas():
        found, now, count = _check_stream(view, meta)
        report.problems += found
        if now is not None:
            held.append(now)
            report.streams += 1
            report.events += count
    report.counter = counter = view.counter()
    for meta in held:
        if meta.head > counter:
            report.problems.append(
                f"{meta.key}: head {meta.head} is above the stored counter {counter}: ids could be reused")
    for key in sorted(view.orphan_keys()):
        report.problems.append(f"{key}: records without metadata")
    return report


def _check_stream(view: LogView, meta: StreamMeta, rows: list[Row] | None = None,
                  tries: int = 3) -> tuple[list[str], StreamMeta | None, int]:
    """One stream's problems, its metadata as checked (None: it left the log meanwhile) and the
    events it holds (kept in ``rows`` if given). What is found is reported only if the stream did
    not change under the read (retention trimmed or removed it, or it was captured anew)."""
    for _ in range(tries):
        if rows is not None:
            rows.clear()
        found, count = _stream_problems(view, meta, rows)
        if not found:
            return [], meta, count
        again = view.meta(meta.key)
        if again is None:
            return [], None, 0
        if (again.first_seq, again.base, again.created_at) == (meta.first_seq, meta.base, meta.created_at):
            return found, meta, count
        meta = again
    return found, meta, count


def _stream_problems(view: LogView, meta: StreamMeta, rows: list[Row] | None) -> tuple[list[str], int]:
    prefix = f"{meta.key}:"
    problems: list[str] = []
    last = 0
    count = 0
    try:
        for rec in view.records(meta.key, upto=meta.head):  # what commits after the metadata was read is not
            seqs = [seq for seq, _u, _b in rec.events]
            if seqs != list(range(rec.first, rec.first + len(seqs))):
                problems.append(f"{prefix} the record at {rec.first} does not hold consecutive seqs")
            if rec.first <= last:
                problems.append(f"{prefix} seq {rec.first} does not come after {last}")
            last = max(last, seqs[-1] if seqs else rec.first)
            count += len(seqs)
            if rows is not None:
                rows += ((seq, body, rec.time_ms) for seq, _u, body in rec.events)
    except StorageDamaged as exc:
        return [f"{prefix} {exc}"], count
    if last and last != meta.head:
        problems.append(f"{prefix} its metadata says head {meta.head}, its records end at {last}")
    if not meta.first_seq and count != meta.count:  # trimmed streams keep their total count
        problems.append(f"{prefix} its metadata counts {meta.count} events, its records hold {count}")
    if meta.base > meta.head and meta.head and not meta.lost_after:
        problems.append(f"{prefix} base {meta.base} is above its head {meta.head}")
    return problems, count


async def served_details(log: EventLog, meta: StreamMeta, page: int = 2000) -> dict[str, Any]:
    """``details`` for the admin listener, read through the serving log (its gap and error events)."""
    gaps: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    pos, held = (meta.first_seq - 1 if meta.first_seq else 0), 0
    while pos < meta.head:
        entries = await log.read(meta.key, pos, meta.head, page)
        if not entries:
            break
        for seq, body in entries:
            held += 1
            name = event_name(body)
            if name == GAP_EVENT:
                gaps.append({"id": seq, **_data(body)})
            elif name == ERROR_EVENT:
                errors.append({"id": seq, **_data(body)})
        pos = entries[-1][0]
    return {**public(meta), "events_held": held, "gap_markers": gaps, "error_events": errors}
