"""Volume fuzzing: 100,000+ random and mutated frames from a fixed seed.

Unlike the hypothesis tests this does not shrink; it trades that for volume at a low
cost per frame. Every frame goes to a live connection (agent or daemon, in or past
the handshake); a connection the frame closed is replaced by a fresh one. The
invariants are those of :func:`feed_checked`: only ProtocolError escapes, and it
leaves the tunnel CLOSED with an ERROR frame queued.

JSON nested deeper than the recursion limit and tokens holding lone surrogates have
tests of their own (test_codec_limits.py, test_handshake.py).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from netmirror.wire import Connection
from netmirror.wire.frames import CREDIT, HEADER, PING, FrameType

from ._fuzzkit import BASES, FRAME_LIBRARY, Outcome, feed_checked
from ._support import DST, SESSION, SRC, TOKEN, Frame

SEED = 0x6E65746D
FRAMES = 200_000

VALID_TYPES = [int(t) for t in FrameType]
STREAM_IDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 100, 101, 2**31, 2**32 - 2, 2**32 - 1]

#: Bodies of every JSON frame; the generator swaps in odd values and drops keys.
TEMPLATES: dict[int, dict[str, Any]] = {
    FrameType.HELLO: {
        "version": 1,
        "token": TOKEN,
        "session": SESSION,
        "window": 3000,
        "max_frame": 1024,
    },
    FrameType.WELCOME: {
        "version": 1,
        "session": SESSION,
        "window": 3000,
        "max_frame": 1024,
        "info": {},
    },
    FrameType.SUBSCRIBE: {"id": 1, "port": 80, "mode": "steal", "options": {}},
    FrameType.SUBSCRIBED: {"id": 1, "port": 80, "ok": True, "error": ""},
    FrameType.UNSUBSCRIBE: {"id": 1, "port": 80},
    FrameType.OPEN: {"port": 80, "dst": list(DST), "src": list(SRC), "info": {}},
    FrameType.ERROR: {"code": "protocol", "message": "bye"},
}
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    65535,
    65536,
    70000,
    2**31,
    2**64,
    1.5,
    "",
    "x",
    "steal",
    "mirror",
    TOKEN,
    "wrong-token",
    SESSION,
    [],
    {},
    ["10.0.0.1", 80],
    ["10.0.0.1"],
    ["h", True],
    [1, 2, 3],
    {"a": [1, {"b": None}]},
]

#: The library split by the connection each frame is valid for.
LIBRARY: dict[str, list[Frame]] = {
    name: [frame for frame, factory in FRAME_LIBRARY if factory is BASES[name][1]] for name in BASES
}
FACTORIES: dict[str, Callable[[], Connection]] = {
    name: factory for name, (_stream, factory) in BASES.items()
}
NAMES = sorted(BASES)


def encode(ftype: int, stream_id: int, payload: bytes) -> bytes:
    return HEADER.pack(ftype, stream_id, len(payload)) + payload


def random_json(rng: random.Random, ftype: int) -> bytes:
    body = dict(TEMPLATES.get(ftype) or rng.choice(list(TEMPLATES.values())))
    for _ in range(rng.randrange(3)):
        key = rng.choice([*body, "extra"])
        if rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = rng.choice(ODD_VALUES)
    if rng.random() < 0.05:
        return json.dumps(rng.choice(ODD_VALUES)).encode()
    return json.dumps(body).encode()


def random_frame(rng: random.Random) -> bytes:
    """A frame built from scratch: plausible type, id and payload, or nonsense."""
    ftype = rng.choice(VALID_TYPES) if rng.random() < 0.9 else rng.randrange(256)
    stream_id = rng.choice(STREAM_IDS) if rng.random() < 0.95 else rng.randrange(2**32)
    roll = rng.random()
    if ftype in TEMPLATES and roll < 0.8:
        payload = random_json(rng, ftype)
    elif ftype == FrameType.CREDIT and roll < 0.8:
        payload = CREDIT.pack(rng.choice([0, 1, 100, 3000, 2**31 - 1, 2**32 - 1]))
    elif ftype in (FrameType.PING, FrameType.PONG) and roll < 0.8:
        payload = PING.pack(rng.randrange(2**64))
    elif ftype == FrameType.DATA and roll < 0.8:
        payload = b"d" * rng.choice([0, 1, 100, 1024, 1025, 3000])
    else:
        payload = rng.randbytes(rng.randrange(24))
    if rng.random() < 0.03:
        # A header that lies about the length.
        length = rng.choice([0, len(payload) + 1, 2**16, 2**32 - 1, max(len(payload) - 1, 0)])
        return HEADER.pack(ftype, stream_id, length) + payload
    return encode(ftype, stream_id, payload)


def mutated_frame(rng: random.Random, frame: Frame) -> bytes:
    """A valid frame with a few bytes flipped, set, inserted or removed."""
    buf = bytearray(encode(frame.ftype, frame.stream_id, frame.payload))
    for _ in range(rng.randrange(1, 4)):
        # Mutate the header half of the time: it is where the structure is.
        limit = 9 if rng.random() < 0.5 else len(buf)
        pos = rng.randrange(max(min(limit, len(buf)), 1))
        kind = rng.randrange(5)
        if kind == 0 and pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and pos < len(buf):
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 4))
        elif kind == 3:
            del buf[pos : pos + rng.randrange(1, 4)]
        else:
            del buf[rng.randrange(len(buf) + 1) :]
    return bytes(buf)


def test_volume_random_and_mutated_frames() -> None:
    rng = random.Random(SEED)
    conns = {name: FACTORIES[name]() for name in NAMES}
    outcome = Outcome()
    fresh = 0
    frames = 0
    started = time.perf_counter()
    while frames < FRAMES:
        name = rng.choice(NAMES)
        roll = rng.random()
        if roll < 0.45:
            batch = [mutated_frame(rng, rng.choice(LIBRARY[name]))]
        elif roll < 0.55:
            # Untouched valid frames keep connections alive and build up state.
            chosen = rng.choice(LIBRARY[name])
            batch = [encode(chosen.ftype, chosen.stream_id, chosen.payload)]
        else:
            batch = [random_frame(rng) for _ in range(rng.choice([1, 1, 1, 2, 4]))]
        frames += len(batch)
        data = b"".join(batch)
        if len(data) > 1 and rng.random() < 0.2:
            cut = rng.randrange(1, len(data))
            chunks = [data[:cut], data[cut:]]
        else:
            chunks = [data]
        if not feed_checked(conns[name], chunks, outcome):
            conns[name] = FACTORIES[name]()
            fresh += 1
    elapsed = time.perf_counter() - started
    print(
        f"\n{frames} frames in {elapsed:.1f}s: {outcome.accepted} calls accepted, "
        f"{outcome.violations} violations, {fresh} fresh connections"
    )
    assert frames >= FRAMES
    # The mix must exercise both paths, not just bounce off the header check.
    assert outcome.violations > FRAMES // 10
    assert outcome.accepted > FRAMES // 10
