"""Who may take a port: the pure policy, and the agent's answers to SUBSCRIBE.

The agent runs against a daemon Connection through the protocol; its firewall,
the listening sockets and the view of other sessions' rules are fakes, so no
iptables runs and no socket is opened.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from netmirror.agent import agent as agent_module
from netmirror.agent.agent import Agent
from netmirror.agent.options import AgentOptions
from netmirror.netfilter import Backend, Redirect
from netmirror.tunnel import Tunnel
from netmirror.wire import Connection, SubscriptionAnswered
from netmirror.wire.connection import token_sha256
from netmirror.wire.ports import Claim, port_conflict
from tests.unit.wire._support import SESSION, TOKEN, connected, pump

PORT = 8080

# --- the pure policy -------------------------------------------------------------------


def test_a_free_port_has_no_conflict() -> None:
    assert port_conflict(PORT, Claim("a"), []) is None
    assert port_conflict(PORT, Claim("a", filtered=True), []) is None


def test_whole_against_whole_conflicts() -> None:
    held = Claim("b")
    conflict = port_conflict(PORT, Claim("a"), [held])
    assert conflict is not None
    assert conflict.holder is held
    assert conflict.reason == "port 8080 is already taken by session 'b'"


def test_filtered_sessions_share_the_port() -> None:
    held = [Claim("b", filtered=True), Claim("c", filtered=True)]
    assert port_conflict(PORT, Claim("a", filtered=True), held) is None


def test_filtered_sessions_share_with_the_router() -> None:
    router = Claim("http-8080", filtered=True, router=True)
    assert port_conflict(PORT, Claim("a", filtered=True), [router]) is None


def test_a_whole_steal_cannot_take_a_filtered_port() -> None:
    held = Claim("b", filtered=True)
    conflict = port_conflict(PORT, Claim("a"), [held])
    assert conflict is not None and conflict.holder is held
    assert "shared by HTTP-filtered session 'b'" in conflict.reason
    assert "steal with an HTTP filter" in conflict.reason


def test_a_whole_steal_cannot_take_the_routers_port() -> None:
    router = Claim("http-8080", filtered=True, router=True)
    conflict = port_conflict(PORT, Claim("a"), [router])
    assert conflict is not None and conflict.holder is router
    assert "shared by sessions that steal only some HTTP requests" in conflict.reason
    assert "http-8080" not in conflict.reason  # the router is no session to name


def test_a_filtered_steal_cannot_share_a_port_stolen_whole() -> None:
    held = Claim("b")
    conflict = port_conflict(PORT, Claim("a", filtered=True), [held])
    assert conflict is not None and conflict.holder is held
    assert conflict.reason == (
        "port 8080 is stolen whole by session 'b'; an HTTP-filtered steal cannot share it"
    )


@pytest.mark.parametrize("filtered", [False, True])
@pytest.mark.parametrize("held_filtered", [False, True])
def test_a_session_never_conflicts_with_itself(filtered: bool, held_filtered: bool) -> None:
    held = [Claim("a", filtered=held_filtered)]
    assert port_conflict(PORT, Claim("a", filtered=filtered), held) is None


def test_the_first_conflicting_claim_is_named() -> None:
    held = [Claim("a"), Claim("b", filtered=True), Claim("c"), Claim("d")]
    conflict = port_conflict(PORT, Claim("a", filtered=True), held)
    assert conflict is not None
    assert conflict.holder == Claim("c")


def test_own_claims_are_skipped_before_others() -> None:
    held = [Claim("a"), Claim("b")]
    conflict = port_conflict(PORT, Claim("a"), held)
    assert conflict is not None and conflict.holder.session == "b"


# --- the agent's answers ---------------------------------------------------------------


class FakeFirewall:
    """Records the plans applied instead of running iptables."""

    def __init__(self) -> None:
        self.applied: list[list[Redirect]] = []
        self.fail: str | None = None

    def plan(self, redirects: list[Redirect]) -> list[Redirect]:
        return list(redirects)

    def apply(self, plan: list[Redirect]) -> None:
        if self.fail:
            from netmirror.errors import FirewallError

            raise FirewallError(self.fail)
        self.applied.append(plan)

    def teardown(self) -> None:
        self.applied.append([])


class FakeServer:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class IdleSocket:
    closed = False


class World:
    """An agent with a daemon attached, and the fakes around it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.others: dict[str, set[int]] = {}  # other sessions' rules in the namespace
        self.alive: set[str] = set()
        self.servers: list[FakeServer] = []
        self.next_port = 40000
        self.firewall = FakeFirewall()
        monkeypatch.setattr(agent_module, "list_sessions", self._list_sessions)
        monkeypatch.setattr(agent_module, "session_alive", lambda name: name in self.alive)
        monkeypatch.setattr(agent_module, "listen_any_port", self._listen_any_port)
        options = AgentOptions(
            session=SESSION, listen="unix:/nonexistent", token_digest=token_sha256(TOKEN), ttl=5
        )
        self.agent = Agent(options, backend=Backend.NFT, firewall=cast(Any, self.firewall), info={})
        self.daemon, conn = connected()
        self.conn: Connection = conn
        self.tunnel = Tunnel(cast(Any, IdleSocket()), conn, handler=self.agent._on_event, name="t")
        self.agent.link.tunnel = self.tunnel
        self._spawned: list[asyncio.Task[Any]] = []
        self._real_spawn = self.agent.tasks.spawn
        monkeypatch.setattr(self.agent.tasks, "spawn", self._spawn)

    def _spawn(self, coro: Any, *, name: str) -> asyncio.Task[Any]:
        task = self._real_spawn(coro, name=name)
        self._spawned.append(task)
        return task

    async def settle(self) -> None:
        """Wait until the tasks the agent started (the subscribe handlers) are done."""
        spawned, self._spawned = self._spawned, []
        assert spawned, "the agent started no task"
        await asyncio.wait_for(asyncio.gather(*spawned), 5)

    def _list_sessions(self, backend: Backend) -> dict[str, set[int]]:
        assert backend is Backend.NFT
        return {SESSION: {p for p in self.agent.subs}, **self.others}

    async def _listen_any_port(self, factory: Any) -> list[tuple[int, Any, int]]:
        server = FakeServer()
        self.servers.append(server)
        self.next_port += 1
        return [(4, server, self.next_port)]

    async def subscribe(self, mode: str, port: int = PORT, **options: Any) -> SubscriptionAnswered:
        """The daemon asks; the agent handles the request; the daemon reads the answer."""
        request_id = self.daemon.subscribe(port, mode, options)
        return await self._answer(request_id)

    async def unsubscribe(self, port: int = PORT) -> SubscriptionAnswered:
        return await self._answer(self.daemon.unsubscribe(port))

    async def _answer(self, request_id: int) -> SubscriptionAnswered:
        self.conn.receive_data(self.daemon.data_to_send())
        for event in self.conn.events_received():
            self.tunnel._dispatch(event, self.tunnel.bridges)
        await self.settle()
        (answer,) = pump(self.conn, self.daemon)
        assert isinstance(answer, SubscriptionAnswered)
        assert answer.request_id == request_id
        return answer


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


async def test_a_steal_takes_the_port_with_a_rule(world: World) -> None:
    answer = await world.subscribe("steal")
    assert (answer.ok, answer.error, answer.port) == (True, "", PORT)
    assert world.firewall.applied == [[Redirect(PORT, 40001, 4)]]
    assert world.agent.subs[PORT].mode == "steal"


async def test_the_same_steal_again_is_granted_without_new_rules(world: World) -> None:
    assert (await world.subscribe("steal")).ok
    answer = await world.subscribe("steal")
    assert (answer.ok, answer.error) == (True, "")
    assert len(world.servers) == 1  # no second listener
    assert len(world.firewall.applied) == 1


async def test_the_same_mirror_again_is_granted(world: World) -> None:
    assert (await world.subscribe("mirror", method="passthrough")).ok
    answer = await world.subscribe("mirror", method="passthrough")
    assert (answer.ok, answer.error) == (True, "")
    assert len(world.servers) == 1
    assert world.agent.subs[PORT].method == "passthrough"


async def test_a_mirror_of_a_stolen_port_is_refused(world: World) -> None:
    assert (await world.subscribe("steal")).ok
    answer = await world.subscribe("mirror", method="passthrough")
    assert not answer.ok
    assert answer.error == f"port {PORT} is already taken in steal mode"
    assert world.agent.subs[PORT].mode == "steal"  # the first one stays
    assert len(world.servers) == 1


async def test_a_steal_of_a_mirrored_port_is_refused(world: World) -> None:
    assert (await world.subscribe("mirror", method="passthrough")).ok
    answer = await world.subscribe("steal")
    assert not answer.ok
    assert answer.error == f"port {PORT} is already taken in mirror mode"
    assert world.agent.subs[PORT].mode == "mirror"


async def test_a_mirror_by_another_method_is_refused(world: World) -> None:
    assert (await world.subscribe("mirror", method="passthrough")).ok
    answer = await world.subscribe("mirror", method="capture")
    assert not answer.ok
    assert "already taken in mirror mode" in answer.error
    assert world.agent.subs[PORT].method == "passthrough"


async def test_a_filtered_steal_of_a_port_stolen_whole_is_refused(world: World) -> None:
    assert (await world.subscribe("steal")).ok
    answer = await world.subscribe("steal", http_filter={"path": "^/api/"})
    assert not answer.ok
    assert "already taken in steal mode" in answer.error
    assert world.agent.subs[PORT].http is None


async def test_an_unknown_mirror_method_is_refused_before_anything(world: World) -> None:
    answer = await world.subscribe("mirror", method="telepathy")
    assert not answer.ok
    assert answer.error == "unknown mirror method 'telepathy'"
    assert world.agent.subs == {} and world.servers == []


async def test_a_port_given_back_may_be_taken_in_another_mode(world: World) -> None:
    assert (await world.subscribe("steal")).ok
    released = await world.unsubscribe()
    assert released.ok
    assert world.servers[0].closed
    assert world.firewall.applied[-1] == []
    answer = await world.subscribe("mirror", method="passthrough")
    assert answer.ok
    assert world.agent.subs[PORT].mode == "mirror"


async def test_other_ports_are_independent(world: World) -> None:
    assert (await world.subscribe("steal", port=8080)).ok
    assert (await world.subscribe("mirror", port=9090, method="passthrough")).ok
    assert set(world.agent.subs) == {8080, 9090}
    assert world.firewall.applied[-1] == [Redirect(8080, 40001, 4), Redirect(9090, 40002, 4)]


async def test_a_port_another_live_session_steals_is_refused(world: World) -> None:
    world.others = {"other": {PORT}}
    world.alive = {"other"}
    answer = await world.subscribe("steal")
    assert not answer.ok
    assert answer.error == "port 8080 is already taken by session 'other'"
    assert world.agent.subs == {} and world.servers == []
    assert world.firewall.applied == []


async def test_a_dead_sessions_rules_do_not_hold_the_port(world: World) -> None:
    world.others = {"other": {PORT}}
    world.alive = set()
    assert (await world.subscribe("steal")).ok


async def test_another_sessions_other_port_does_not_conflict(world: World) -> None:
    world.others = {"other": {9090}}
    world.alive = {"other"}
    assert (await world.subscribe("steal")).ok


async def test_a_whole_steal_of_a_port_the_router_holds_is_refused(world: World) -> None:
    world.others = {"http-8080": {PORT}}
    world.alive = {"http-8080"}
    answer = await world.subscribe("mirror", method="passthrough")
    assert not answer.ok
    assert "shared by sessions that steal only some HTTP requests" in answer.error


async def test_the_agents_own_rules_do_not_hold_the_port_against_it(world: World) -> None:
    # Its own chain (left from before a reconnect, say) lists the port.
    world.others = {SESSION: {PORT}}
    world.alive = {SESSION}
    assert (await world.subscribe("steal")).ok


async def test_a_firewall_failure_refuses_and_gives_the_port_back(world: World) -> None:
    world.firewall.fail = "iptables-nft-restore: permission denied"
    answer = await world.subscribe("steal")
    assert not answer.ok
    assert "permission denied" in answer.error
    assert world.agent.subs == {}
    assert world.servers[0].closed
    world.firewall.fail = None
    assert (await world.subscribe("mirror", method="passthrough")).ok


async def test_two_subscribes_at_once_get_one_listener(world: World) -> None:
    first = world.daemon.subscribe(PORT, "steal", {})
    second = world.daemon.subscribe(PORT, "steal", {})
    world.conn.receive_data(world.daemon.data_to_send())
    for event in world.conn.events_received():
        world.tunnel._dispatch(event, world.tunnel.bridges)
    await world.settle()
    answers = pump(world.conn, world.daemon)
    assert {a.request_id for a in answers if isinstance(a, SubscriptionAnswered)} == {
        first,
        second,
    }
    assert all(isinstance(a, SubscriptionAnswered) and a.ok for a in answers)
    assert len(world.servers) == 1
