"""How the CLI shows sessions to people: ``status`` and the lines of ``up`` and ``exec``."""

from __future__ import annotations

from typing import Any

from netmirror.wire.stats import PortStatus, SessionStatus, from_json


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def status_of(answer: Any) -> SessionStatus:
    """A daemon's status record, typed; one naming what was wrong with it if unreadable."""
    try:
        return from_json(SessionStatus, answer)
    except ValueError as exc:
        name = answer.get("session", "?") if isinstance(answer, dict) else "?"
        return SessionStatus(session=str(name), state="unreadable", error=str(exc))


def port_line(port: PortStatus) -> str:
    """``steal 8080 -> 127.0.0.1:3000``: one port of a session, in a line."""
    return f"{port.mode} {port.remote} -> {port.local}"


def status_lines(st: SessionStatus) -> list[str]:
    """The text of ``netmirror status`` for one session."""
    daemon_pid = st.daemon_pid if st.daemon_pid is not None else "?"
    lines = [f"session {st.session}  target {st.target}  state {st.state}  daemon pid {daemon_pid}"]
    if st.error:
        lines.append(f"  {st.error}")
    agent = st.agent
    if agent is not None:
        extra = f", {agent.backend} rules" if agent.backend else ""
        pid = agent.pid if agent.pid is not None else "?"
        lines.append(f"  agent: {agent.state} (pid {pid}{extra})")
        if agent.where:
            lines.append(f"  agent runs as: {agent.where}")
        if agent.mesh:
            lines.append(f"  mesh: {agent.mesh}")
    if st.ports:
        lines.append(
            f"  {'PORT':>6}  {'MODE':<7} {'LOCAL':<22} {'STATE':<8} {'CONNS':>11}"
            f" {'IN':>10} {'OUT':>10} {'ERRORS':>6}"
        )
    for p in st.ports:
        conns = f"{p.connections_total}/{p.connections_open}"
        lines.append(
            f"  {p.remote:>6}  {p.mode:<7} {p.local:<22} {p.state:<8} {conns:>11}"
            f" {format_bytes(p.bytes_in):>10} {format_bytes(p.bytes_out):>10} {p.errors:>6}"
        )
        if p.probes:
            lines.append(f"          probes {p.probes}")
        if p.http is not None:
            lines.append(
                f"          HTTP filter {p.http.filter}: {p.http.matched} requests matched, "
                f"{p.http.passed} passed to the target "
                f"(place {p.http.order or '?'} of {len(p.http.sessions) or '?'})"
            )
        if p.mirror is not None:
            m = p.mirror
            lines.append(
                f"          {p.method}: {m.flows} copied, {m.partial} partial, {m.gaps} gaps, "
                f"{m.dropped} dropped (fell behind)"
            )
        if p.last_error:
            lines.append(f"          last error: {p.last_error}")
    if st.ports:
        lines.append("  (CONNS is total/open; IN is client to local, OUT local to client)")
    for u in st.unserved:
        what = "stolen anyway" if u.taken else "left alone"
        lines.append(
            f"  port {u.remote}: the command listens on {u.local}, but the target does not "
            f"serve it ({what})"
        )
    if st.capture is not None:
        c = st.capture
        lines.append(
            f"  capture: {c.packets} packets, {c.kernel_drops} dropped by the kernel, "
            f"{c.truncated} truncated"
        )
    if st.files is not None and st.files.root:
        fs = st.files
        writable = f"; writable: {', '.join(fs.writable)}" if fs.writable else ""
        lines.append(
            f"  files: the target's root at {fs.root} (read-only{writable}; "
            f"{fs.requests} requests, {format_bytes(fs.bytes_read)} read)"
        )
    if st.outgoing is not None:
        o = st.outgoing
        routed = "; its own routes" if o.routed else ""
        lines.append(
            f"  outgoing ({o.method}{routed}): {o.connections_total}/{o.connections_open} "
            f"TCP connections, {format_bytes(o.bytes_in)} sent, "
            f"{format_bytes(o.bytes_out)} received, {o.errors} errors; "
            f"DNS {o.dns_queries} queries, {o.dns_failures} failed"
        )
        if o.udp_associations or o.udp_datagrams_out:
            lines.append(
                f"          UDP: {o.udp_associations} sockets, {o.udp_datagrams_out} datagrams"
                f" sent, {o.udp_datagrams_in} answers"
            )
        if o.last_error:
            lines.append(f"          last error: {o.last_error}")
    for fw in st.forwards:
        lines.append(
            f"  forward {fw.local} -> {fw.to} (from the target): {fw.connections_total}"
            f"/{fw.connections_open} connections, {format_bytes(fw.bytes_in)} in,"
            f" {format_bytes(fw.bytes_out)} out, {fw.errors} errors"
        )
    if st.pcap is not None:
        f = st.pcap
        lines.append(f"  pcap: {f.path} ({format_bytes(f.bytes)}, {f.records} packets, {f.state})")
    return lines
