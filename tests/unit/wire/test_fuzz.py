"""Property tests: a modelled round trip, then random and mutated input."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netmirror.wire import (
    Connection,
    CreditGranted,
    DataReceived,
    Limits,
    State,
    StreamHalfClosed,
    StreamOpened,
    StreamReset,
)
from netmirror.wire.frames import CREDIT, HEADER, PING

from ._fuzzkit import BASES, Outcome, check_bases, feed_checked, fresh_agent, fresh_daemon
from ._support import DST, SESSION, SRC, TOKEN, connected

Side = Literal["agent", "daemon"]
SIDES: tuple[Side, Side] = ("agent", "daemon")

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A long deterministic pattern; each stream sends a different stretch of it.
PATTERN = bytes((i * 7919 + (i >> 8) * 31) & 0xFF for i in range(1 << 17))


# ----------------------------------------------------------- round-trip model


@dataclass(frozen=True)
class Open:
    side: Side


@dataclass(frozen=True)
class Send:
    side: Side
    pick: int
    size: int


@dataclass(frozen=True)
class Grant:
    side: Side
    pick: int
    percent: int
    extra: int


@dataclass(frozen=True)
class Shutdown:
    side: Side
    pick: int


@dataclass(frozen=True)
class Reset:
    side: Side
    pick: int


@dataclass(frozen=True)
class Deliver:
    to: Side
    percent: int
    chunks: tuple[int, ...]


Op = Open | Send | Grant | Shutdown | Reset | Deliver

sides = st.sampled_from(SIDES)
picks = st.integers(0, 50)
deliveries = st.builds(
    Deliver,
    sides,
    st.sampled_from([100, 100, 50, 10, 0]) | st.integers(0, 100),
    st.lists(st.integers(1, 2000), min_size=1, max_size=6).map(tuple),
)
sends = st.builds(Send, sides, picks, st.sampled_from([1, 1024, 5000]) | st.integers(0, 5000))
ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(Open, sides),
    sends,
    sends,
    deliveries,
    deliveries,
    st.builds(Grant, sides, picks, st.integers(0, 100), st.sampled_from([0, 0, 0, 1, 5000])),
    st.builds(Shutdown, sides, picks),
    st.builds(Reset, sides, picks),
)
#: Scripts start with a stream from each side so that the other ops have targets.
scripts = st.lists(ops, min_size=10, max_size=80).map(
    lambda rest: [Open("agent"), Open("daemon"), *rest]
)
limits = st.builds(
    Limits,
    max_frame_size=st.sampled_from([1024, 1500, 4096]),
    initial_window=st.sampled_from([1, 700, 3000, 20000]),
    max_streams=st.sampled_from([1, 4, 100]),
)


@dataclass
class Model:
    """What each side did and saw, keyed by (stream id, side)."""

    conns: dict[Side, Connection]
    limits: dict[Side, Limits]
    wire: dict[Side, bytearray] = field(default_factory=lambda: {s: bytearray() for s in SIDES})
    streams: list[int] = field(default_factory=list)
    sent: dict[tuple[int, Side], bytearray] = field(default_factory=dict)
    got: dict[tuple[int, Side], bytearray] = field(default_factory=dict)
    window: dict[tuple[int, Side], int] = field(default_factory=dict)
    consumed: dict[tuple[int, Side], int] = field(default_factory=dict)
    shut: set[tuple[int, Side]] = field(default_factory=set)
    half_closed: set[tuple[int, Side]] = field(default_factory=set)
    reset: set[int] = field(default_factory=set)

    @staticmethod
    def other(side: Side) -> Side:
        return "daemon" if side == "agent" else "agent"

    def collect(self) -> None:
        for side in SIDES:
            self.wire[self.other(side)] += self.conns[side].data_to_send()

    def pick(self, side: Side, index: int) -> int | None:
        """Mostly a stream ``side`` knows; sometimes any (to exercise no-ops)."""
        if not self.streams:
            return None
        alive = [s for s in self.streams if self.conns[side].is_open(s)]
        if alive and index % 8:
            return alive[index % len(alive)]
        return self.streams[index % len(self.streams)]

    def start(self, sid: int, side: Side) -> None:
        """``side`` learned of stream ``sid``; its window is what the peer allows."""
        self.window[(sid, side)] = self.limits[self.other(side)].initial_window
        self.sent.setdefault((sid, side), bytearray())
        self.got.setdefault((sid, side), bytearray())
        self.consumed.setdefault((sid, side), 0)

    def check_window(self, sid: int, side: Side) -> None:
        conn = self.conns[side]
        if conn.is_open(sid) and (sid, side) not in self.shut:
            assert conn.send_window(sid) == self.window[(sid, side)]
        else:
            assert conn.send_window(sid) == 0

    def apply(self, op: Op) -> None:
        if isinstance(op, Deliver):
            self.deliver(op.to, op.percent, op.chunks)
            return
        if isinstance(op, Open):
            conn = self.conns[op.side]
            new = conn.open_stream(port=8080, original_dst=DST, client=SRC)
            earlier = [s for s in self.streams if s % 2 == new % 2]
            assert not earlier or new > max(earlier)
            assert new % 2 == (1 if op.side == "agent" else 0)
            self.streams.append(new)
            self.start(new, op.side)
            self.collect()
            return
        side = op.side
        sid = self.pick(side, op.pick)
        if sid is None:
            return
        conn = self.conns[side]
        known = conn.is_open(sid)
        if isinstance(op, Send):
            self.check_window(sid, side)
            room = conn.send_window(sid)
            stream_sent = self.sent.setdefault((sid, side), bytearray())
            start = (sid * 4099 + len(stream_sent)) % (1 << 16)
            payload = PATTERN[start : start + op.size]
            taken = conn.send_data(sid, payload)
            assert taken == min(op.size, room)
            assert conn.send_window(sid) == room - taken
            if taken:
                stream_sent += payload[:taken]
                self.window[(sid, side)] -= taken
                assert self.window[(sid, side)] >= 0
        elif isinstance(op, Grant):
            consumed = self.consumed.get((sid, side), 0)
            amount = consumed * op.percent // 100 + op.extra
            before = conn.pending_output
            conn.grant(sid, amount)
            if conn.pending_output > before:
                assert known and amount > 0
                self.consumed[(sid, side)] = consumed - amount
        elif isinstance(op, Shutdown):
            conn.shutdown(sid)
            if known:
                self.shut.add((sid, side))
            assert conn.send_window(sid) == 0
        else:
            conn.reset(sid, "reset by model")
            if known:
                self.reset.add(sid)
            assert not conn.is_open(sid)
        self.collect()

    def deliver(self, to: Side, percent: int, chunks: tuple[int, ...]) -> None:
        wire = self.wire[to]
        amount = len(wire) * percent // 100
        payload = bytes(wire[:amount])
        del wire[:amount]
        conn = self.conns[to]
        offset = 0
        i = 0
        while offset < len(payload):
            size = chunks[i % len(chunks)]
            conn.receive_data(payload[offset : offset + size])
            offset += size
            i += 1
            for event in conn.events_received():
                self.on_event(to, event)
        self.collect()

    def on_event(self, side: Side, event: object) -> None:
        peer = self.other(side)
        if isinstance(event, StreamOpened):
            assert event.stream_id in self.streams
            assert event.stream_id % 2 == (0 if side == "agent" else 1)
            self.start(event.stream_id, side)
        elif isinstance(event, DataReceived):
            sid = event.stream_id
            assert event.data
            self.got[(sid, side)] += event.data
            self.consumed[(sid, side)] += len(event.data)
            # Never more than was taken by send_data, and in order.
            sent = self.sent[(sid, peer)]
            got = self.got[(sid, side)]
            assert sent[: len(got)] == got
            # Split by the smaller of both sides' frame limits.
            assert len(event.data) <= min(
                self.limits[side].max_frame_size, self.limits[peer].max_frame_size
            )
        elif isinstance(event, StreamHalfClosed):
            assert (event.stream_id, peer) in self.shut
            assert (event.stream_id, side) not in self.half_closed
            self.half_closed.add((event.stream_id, side))
        elif isinstance(event, StreamReset):
            self.reset.add(event.stream_id)
        elif isinstance(event, CreditGranted):
            key = (event.stream_id, side)
            self.window[key] += event.amount
            assert event.window == self.window[key]
        else:
            raise AssertionError(f"unexpected event {event!r}")

    def settle(self) -> None:
        self.collect()
        while self.wire["agent"] or self.wire["daemon"]:
            for side in SIDES:
                self.deliver(side, 100, (4096,))

    def verify(self) -> None:
        for side in SIDES:
            assert self.conns[side].state is State.OPEN
        for sid in self.streams:
            for side in SIDES:
                peer = self.other(side)
                sent = bytes(self.sent.get((sid, side), b""))
                got = bytes(self.got.get((sid, peer), b""))
                if sid in self.reset:
                    assert sent.startswith(got)
                else:
                    assert got == sent, (sid, side)
                    if (sid, side) in self.shut:
                        assert (sid, peer) in self.half_closed
            if sid not in self.reset and all((sid, s) in self.shut for s in SIDES):
                assert not any(self.conns[s].is_open(sid) for s in SIDES)
            elif sid in self.reset:
                assert not any(self.conns[s].is_open(sid) for s in SIDES)
            else:
                for side in SIDES:
                    self.check_window(sid, side)


def random_op(rng: random.Random) -> Op:
    """One op of a dense script: mostly sending, delivering and granting."""
    side: Side = rng.choice(SIDES)
    pick = rng.randrange(64)
    kind = rng.choices(
        ["open", "send", "deliver", "grant", "shutdown", "reset"], [2, 10, 10, 6, 1, 0.5]
    )[0]
    if kind == "open":
        return Open(side)
    if kind == "send":
        return Send(side, pick, rng.choice([1, 1024, rng.randrange(6000)]))
    if kind == "deliver":
        chunks = tuple(rng.randrange(1, 3000) for _ in range(rng.randrange(1, 5)))
        return Deliver(side, rng.choice([100, rng.randrange(101)]), chunks)
    if kind == "grant":
        return Grant(side, pick, rng.randrange(101), rng.choice([0, 0, 0, 0, 1, 5000]))
    if kind == "shutdown":
        return Shutdown(side, pick)
    return Reset(side, pick)


@settings(FUZZ, max_examples=1000)
@given(
    daemon_limits=limits,
    agent_limits=limits,
    script=scripts,
)
def test_round_trip_model(daemon_limits: Limits, agent_limits: Limits, script: list[Op]) -> None:
    daemon, agent = connected(daemon_limits, agent_limits)
    model = Model(
        conns={"agent": agent, "daemon": daemon},
        limits={"agent": agent_limits, "daemon": daemon_limits},
    )
    for op in script:
        model.apply(op)
    model.settle()
    model.verify()


@settings(FUZZ, max_examples=300)
@given(daemon_limits=limits, agent_limits=limits, seed=st.integers(0, 2**64 - 1))
def test_round_trip_dense(daemon_limits: Limits, agent_limits: Limits, seed: int) -> None:
    """Long scripts from a seed: less shrinkable, but they move many bytes."""
    rng = random.Random(seed)
    daemon, agent = connected(daemon_limits, agent_limits)
    model = Model(
        conns={"agent": agent, "daemon": daemon},
        limits={"agent": agent_limits, "daemon": daemon_limits},
    )
    for op in [Open("agent"), Open("daemon"), *(random_op(rng) for _ in range(300))]:
        model.apply(op)
    model.settle()
    model.verify()


def test_round_trip_model_fills_windows() -> None:
    """A fixed script that exhausts a window and reopens it, as a sanity check."""
    daemon, agent = connected(Limits(initial_window=700), Limits(initial_window=700))
    model = Model(
        conns={"agent": agent, "daemon": daemon},
        limits={"agent": Limits(initial_window=700), "daemon": Limits(initial_window=700)},
    )
    script: list[Op] = [
        Open("agent"),
        Send("agent", 0, 5000),
        Deliver("daemon", 100, (3,)),
        Grant("daemon", 0, 100, 0),
        Deliver("agent", 100, (1,)),
        Send("agent", 0, 5000),
        Shutdown("agent", 0),
        Shutdown("daemon", 0),
    ]
    for op in script:
        model.apply(op)
    model.settle()
    model.verify()
    assert len(model.sent[(1, "agent")]) == 1400
    assert not agent.is_open(1) and not daemon.is_open(1)


# --------------------------------------------------------------- random input

stream_ids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 100, 2**31, 2**32 - 1])
json_keys = st.sampled_from(
    [
        *("id", "port", "mode", "options", "dst", "src", "info", "ok", "error", "code"),
        *("message", "version", "token", "session", "window", "max_frame"),
    ]
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.integers(),
    st.floats(allow_nan=False),
    st.sampled_from(["", "steal", "mirror", "x", TOKEN, SESSION, "10.0.0.1", "::1"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=3),
    max_leaves=8,
)
json_payloads = st.dictionaries(json_keys, json_values, max_size=6).map(
    lambda body: json.dumps(body).encode()
)
payloads = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 2**32 - 1).map(CREDIT.pack),
    st.integers(0, 2**64 - 1).map(PING.pack),
    json_payloads,
)
frames = st.builds(
    lambda ftype, sid, payload: HEADER.pack(ftype, sid, len(payload)) + payload,
    st.integers(0, 15) | st.integers(0, 255),
    stream_ids,
    payloads,
)
garbage = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.lists(frames, min_size=1, max_size=8).map(b"".join),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)] or [b""]


@settings(FUZZ, max_examples=1000)
@given(data=garbage, cuts=st.lists(st.integers(0, 10_000), max_size=4))
def test_random_bytes_after_handshake(data: bytes, cuts: list[int]) -> None:
    for conn in (fresh_agent(), fresh_daemon()):
        feed_checked(conn, chunked(data, cuts))


@settings(FUZZ, max_examples=800)
@given(
    prefix=st.lists(frames, max_size=4).map(b"".join),
    data=garbage,
    cuts=st.lists(st.integers(0, 10_000), max_size=3),
)
def test_random_frames_behind_valid_ones(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    """Valid conversation first, so that streams and requests exist, then noise."""
    for name in ("to_agent", "to_daemon"):
        base, factory = BASES[name]
        conn = factory()
        conn.receive_data(base)
        conn.events_received()
        conn.data_to_send()
        feed_checked(conn, chunked(prefix + data, cuts))


@settings(FUZZ, max_examples=600)
@given(data=garbage)
def test_random_bytes_during_handshake(data: bytes) -> None:
    for name in ("agent_handshake", "daemon_handshake"):
        _base, factory = BASES[name]
        feed_checked(factory(), [data])


# -------------------------------------------------------------- mutated input


@dataclass(frozen=True)
class Mutation:
    kind: Literal["flip", "set", "insert", "delete", "duplicate"]
    position: int
    value: int
    length: int


mutations = st.builds(
    Mutation,
    st.sampled_from(["flip", "set", "insert", "delete", "duplicate"]),
    st.integers(0, 1 << 16),
    st.integers(0, 255),
    st.integers(1, 16),
)


def mutate(data: bytes, changes: list[Mutation]) -> bytes:
    buf = bytearray(data)
    for change in changes:
        pos = change.position % (len(buf) + 1)
        if change.kind == "flip" and pos < len(buf):
            buf[pos] ^= 1 << (change.value % 8)
        elif change.kind == "set" and pos < len(buf):
            buf[pos] = change.value
        elif change.kind == "insert":
            buf[pos:pos] = bytes([change.value]) * change.length
        elif change.kind == "delete":
            del buf[pos : pos + change.length]
        elif change.kind == "duplicate":
            buf[pos:pos] = buf[pos : pos + change.length]
    return bytes(buf)


@settings(FUZZ, max_examples=3000)
@given(
    name=st.sampled_from(sorted(BASES)),
    changes=st.lists(mutations, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
)
def test_mutated_frame_streams(name: str, changes: list[Mutation], cuts: list[int]) -> None:
    base, factory = BASES[name]
    feed_checked(factory(), chunked(mutate(base, changes), cuts))


def test_unmutated_bases_are_valid() -> None:
    check_bases()
    for name, (base, factory) in BASES.items():
        outcome = Outcome()
        assert feed_checked(factory(), chunked(base, [1, 100, 1000]), outcome), name
        assert outcome.accepted == 1
