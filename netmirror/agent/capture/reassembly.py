"""TCP reassembly of captured client-to-server bytes, free of I/O and clocks.

Feed :class:`~netmirror.agent.capture.packets.Segment` objects with the current time;
collect events. Per connection (4-tuple) it keeps the next expected 32-bit
sequence number (with wraparound), drops retransmitted and overlapping bytes,
holds out-of-order segments within a byte bound, and **reports gaps** instead of
splicing: when a hole cannot be filled (the buffer bound is hit, or the hole is
older than ``gap_timeout``), the flow gets a :class:`FlowGap` and delivers nothing
more. A connection first seen mid-stream is delivered from its first segment and
flagged ``partial``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netmirror.agent.capture.packets import Segment

SEQ_MASK = 0xFFFFFFFF
#: Seconds an ended flow's key is remembered, to ignore late retransmissions.
ENDED_MEMORY = 30.0

FlowKey = tuple[str, int, str, int]
"""(client address, client port, server address, server port)."""


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in 32-bit sequence space, as a signed number."""
    d = (a - b) & SEQ_MASK
    return d - (1 << 32) if d & 0x80000000 else d


@dataclass(frozen=True, slots=True)
class FlowOpened:
    key: FlowKey
    partial: bool
    """True when the SYN was not seen: the copy starts mid-stream."""


@dataclass(frozen=True, slots=True)
class FlowData:
    key: FlowKey
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowGap:
    """Bytes are missing; the flow delivers nothing more."""

    key: FlowKey
    missing: int
    """Bytes missing before the next held segment (0 if unknown)."""
    offset: int
    """Bytes delivered before the gap."""


@dataclass(frozen=True, slots=True)
class FlowClosed:
    key: FlowKey
    reason: str
    """``fin``, ``rst``, ``idle`` or ``evicted``."""


FlowEvent = FlowOpened | FlowData | FlowGap | FlowClosed


@dataclass(slots=True)
class _Flow:
    next_seq: int
    partial: bool
    last_seen: float
    fin_seq: int | None = None
    held: dict[int, bytes] = field(default_factory=dict)
    held_bytes: int = 0
    held_since: float | None = None
    delivered: int = 0
    failed: bool = False


@dataclass
class Counters:
    """What the reassembler did, for ``netmirror status``."""

    flows: int = 0
    partial: int = 0
    gaps: int = 0
    duplicate_bytes: int = 0
    refused_flows: int = 0


class Reassembler:
    """Client-to-server byte streams of many TCP connections."""

    def __init__(
        self,
        *,
        max_held_bytes: int = 4 * 1024 * 1024,
        max_flows: int = 65536,
        gap_timeout: float = 1.0,
        idle_timeout: float = 600.0,
    ) -> None:
        self.max_held_bytes = max_held_bytes
        self.max_flows = max_flows
        self.gap_timeout = gap_timeout
        self.idle_timeout = idle_timeout
        self.counters = Counters()
        self._flows: dict[FlowKey, _Flow] = {}
        # Recently ended flows: late retransmissions must not reopen them.
        self._ended: dict[FlowKey, float] = {}
        self._refused: dict[FlowKey, float] = {}
        self._events: list[FlowEvent] = []

    def events(self) -> list[FlowEvent]:
        """Events since the last call; empties the list."""
        events, self._events = self._events, []
        return events

    def __len__(self) -> int:
        return len(self._flows)

    def feed(self, seg: Segment, now: float) -> None:
        """Account for one captured client-to-server segment."""
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        flow = self._flows.get(key)
        payload = seg.payload
        seq = seg.seq
        if flow is None:
            if seg.rst or (not payload and not seg.syn):
                return  # nothing to copy: a bare ACK or RST of a connection we never saw
            if not seg.syn and key in self._ended:
                self.counters.duplicate_bytes += len(payload)
                return
            if len(self._flows) >= self.max_flows:
                if seg.syn or key not in self._refused:
                    self.counters.refused_flows += 1
                    self._refused[key] = now
                return
            partial = not seg.syn
            flow = _Flow(
                next_seq=(seq + 1) & SEQ_MASK if seg.syn else seq, partial=partial, last_seen=now
            )
            self._flows[key] = flow
            self.counters.flows += 1
            self.counters.partial += partial
            self._events.append(FlowOpened(key, partial))
        flow.last_seen = now
        if seg.syn:
            seq = (seq + 1) & SEQ_MASK  # data on a SYN (fast open) starts after it
        if seg.rst:
            self._finish(key, flow, "rst")
            return
        if flow.failed:
            if seg.fin:
                self._finish(key, flow, "fin")
            return
        if payload:
            self._add(key, flow, seq, payload, now)
            if flow.failed:
                if seg.fin:
                    self._finish(key, flow, "fin")
                return
        if seg.fin:
            flow.fin_seq = (seq + len(payload)) & SEQ_MASK
            if flow.next_seq != flow.fin_seq and flow.held_since is None:
                # Bytes before the FIN are missing: time the hole like a held segment.
                flow.held_since = now
        if flow.fin_seq is not None and flow.next_seq == flow.fin_seq:
            self._finish(key, flow, "fin")

    def tick(self, now: float) -> None:
        """Declare holes older than ``gap_timeout`` and close idle flows."""
        for key, flow in list(self._flows.items()):
            if (
                not flow.failed
                and flow.held_since is not None
                and now - flow.held_since > self.gap_timeout
            ):
                self._gap(key, flow)
            if now - flow.last_seen > self.idle_timeout:
                self._finish(key, flow, "idle", now)
        for memory in (self._ended, self._refused):
            for key, ended in list(memory.items()):
                if now - ended > ENDED_MEMORY:
                    del memory[key]

    def close_all(self, reason: str = "evicted") -> None:
        """Close every flow (capture stopping)."""
        for key, flow in list(self._flows.items()):
            self._finish(key, flow, reason)

    # --- internals -------------------------------------------------------------

    def _add(self, key: FlowKey, flow: _Flow, seq: int, payload: memoryview, now: float) -> None:
        start = seq_diff(seq, flow.next_seq)
        end = start + len(payload)
        if end <= 0:
            self.counters.duplicate_bytes += len(payload)
            return
        if start <= 0:
            if start < 0:
                self.counters.duplicate_bytes += -start
            self._deliver(key, flow, payload[-start:].tobytes())
            self._drain(key, flow)
            return
        held = flow.held.get(seq)
        if held is not None and len(held) >= len(payload):
            self.counters.duplicate_bytes += len(payload)
            return
        flow.held[seq] = payload.tobytes()
        flow.held_bytes += len(payload) - (len(held) if held is not None else 0)
        if flow.held_since is None:
            flow.held_since = now
        if flow.held_bytes > self.max_held_bytes:
            self._gap(key, flow)

    def _deliver(self, key: FlowKey, flow: _Flow, data: bytes) -> None:
        if data:
            flow.next_seq = (flow.next_seq + len(data)) & SEQ_MASK
            flow.delivered += len(data)
            self._events.append(FlowData(key, data))

    def _drain(self, key: FlowKey, flow: _Flow) -> None:
        """Deliver held segments that now touch the delivered prefix."""
        held = flow.held
        while held:
            progressed = False
            for seq in sorted(held, key=lambda s: seq_diff(s, flow.next_seq)):
                start = seq_diff(seq, flow.next_seq)
                if start > 0:
                    break
                data = held.pop(seq)
                flow.held_bytes -= len(data)
                if start + len(data) > 0:
                    self.counters.duplicate_bytes += -start
                    self._deliver(key, flow, data[-start:] if start else data)
                else:
                    self.counters.duplicate_bytes += len(data)
                progressed = True
            if not progressed:
                break
        if not held and (flow.fin_seq is None or flow.next_seq == flow.fin_seq):
            flow.held_since = None

    def _gap(self, key: FlowKey, flow: _Flow) -> None:
        before_fin = seq_diff(flow.fin_seq, flow.next_seq) if flow.fin_seq is not None else 0
        missing = min((seq_diff(s, flow.next_seq) for s in flow.held), default=before_fin)
        flow.failed = True
        flow.held.clear()
        flow.held_bytes = 0
        flow.held_since = None
        self.counters.gaps += 1
        self._events.append(FlowGap(key, max(missing, 0), flow.delivered))

    def _finish(self, key: FlowKey, flow: _Flow, reason: str, now: float | None = None) -> None:
        hole = flow.fin_seq is not None and flow.next_seq != flow.fin_seq
        if (flow.held or hole) and not flow.failed:
            # Bytes beyond a hole will never be delivered: that is a gap, not an end.
            self._gap(key, flow)
        del self._flows[key]
        self._ended[key] = flow.last_seen if now is None else now
        self._events.append(FlowClosed(key, reason))
