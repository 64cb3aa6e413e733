"""Pure parts of the iptables layer: naming, planning and parsing iptables-save output."""

from __future__ import annotations

import subprocess
from typing import Any, NoReturn

import pytest

from netmirror.errors import FirewallError
from netmirror.netfilter import (
    AGENT_MARK,
    Backend,
    IptablesNat,
    NatPlan,
    Redirect,
    chain_name,
    parse_sessions,
    tables_in_use,
)
from netmirror.netfilter.guard import socket_address

MARK_RULE = "-A NETMIRROR-web -m mark --mark 0x4e4d -j RETURN"


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning must never run anything."""

    def forbidden(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"subprocess used during planning: {args!r}")

    monkeypatch.setattr(subprocess, "run", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)


def test_agent_mark_value() -> None:
    assert AGENT_MARK == 0x4E4D


@pytest.mark.parametrize(
    ("session", "chain"),
    [
        ("web", "NETMIRROR-web"),
        ("a", "NETMIRROR-a"),
        ("0", "NETMIRROR-0"),
        ("my-session-1", "NETMIRROR-my-session-1"),
        ("a" * 18, "NETMIRROR-" + "a" * 18),
    ],
)
def test_chain_name(session: str, chain: str) -> None:
    assert chain_name(session) == chain
    assert len(chain) <= 28


@pytest.mark.parametrize(
    "session",
    ["", "Web", "-web", "web-", "we_b", "we b", "a" * 19, "web\n", "wéb", "a.b", "../x"],
)
def test_invalid_session_names(session: str) -> None:
    with pytest.raises(ValueError, match="invalid session name"):
        chain_name(session)
    with pytest.raises(ValueError):
        IptablesNat(session, backend=Backend.NFT)
    with pytest.raises(ValueError):
        socket_address(session)


def test_backend_binaries() -> None:
    assert Backend.NFT.iptables(4) == "iptables-nft"
    assert Backend.NFT.iptables(6) == "ip6tables-nft"
    assert Backend.NFT.save(4) == "iptables-nft-save"
    assert Backend.NFT.restore(6) == "ip6tables-nft-restore"
    assert Backend.LEGACY.iptables(4) == "iptables-legacy"
    assert Backend.LEGACY.save(6) == "ip6tables-legacy-save"
    assert Backend.LEGACY.restore(4) == "iptables-legacy-restore"
    assert Backend("nft") is Backend.NFT
    assert Backend("legacy") is Backend.LEGACY
    with pytest.raises(ValueError):
        Backend.NFT.iptables(5)


@pytest.mark.parametrize(
    ("port", "to_port", "family"),
    [(0, 80, 4), (80, 0, 4), (65536, 80, 4), (80, 80, 5), (True, 80, 4)],
)
def test_redirect_validation(port: int, to_port: int, family: int) -> None:
    with pytest.raises(ValueError):
        Redirect(port, to_port, family)


def test_plan_v4_and_v6() -> None:
    nat = IptablesNat("web", backend=Backend.NFT)
    plan = nat.plan([Redirect(80, 18080, 4), Redirect(443, 18443, 6)])
    assert isinstance(plan, NatPlan)
    assert plan.session == "web"
    assert plan.chain == "NETMIRROR-web"
    assert plan.families == (4, 6)
    assert plan.text(4) == (
        "*nat\n"
        ":NETMIRROR-web - [0:0]\n"
        f"{MARK_RULE}\n"
        "-A NETMIRROR-web -p tcp -m tcp --dport 80"
        ' -m comment --comment "netmirror session=web port=80"'
        " -j REDIRECT --to-ports 18080\n"
        "COMMIT\n"
    )
    assert plan.text(6) == (
        "*nat\n"
        ":NETMIRROR-web - [0:0]\n"
        f"{MARK_RULE}\n"
        "-A NETMIRROR-web -p tcp -m tcp --dport 443"
        ' -m comment --comment "netmirror session=web port=443"'
        " -j REDIRECT --to-ports 18443\n"
        "COMMIT\n"
    )


def test_plan_several_redirects_sorted_and_deduplicated() -> None:
    nat = IptablesNat("web", backend=Backend.LEGACY)
    redirects = [
        Redirect(8080, 30001, 4),
        Redirect(22, 30002, 4),
        Redirect(8080, 30001, 4),  # exact duplicate: harmless
        Redirect(8080, 30001, 6),
    ]
    plan = nat.plan(redirects)
    assert plan.redirects == (
        Redirect(22, 30002, 4),
        Redirect(8080, 30001, 4),
        Redirect(8080, 30001, 6),
    )
    v4 = plan.text(4).splitlines()
    assert v4[0] == "*nat"
    assert v4[1] == ":NETMIRROR-web - [0:0]"
    assert v4[2] == MARK_RULE  # the agent's own traffic is exempt before anything else
    assert v4[3].startswith("-A NETMIRROR-web -p tcp -m tcp --dport 22 ")
    assert v4[3].endswith("-j REDIRECT --to-ports 30002")
    assert v4[4].startswith("-A NETMIRROR-web -p tcp -m tcp --dport 8080 ")
    assert v4[5] == "COMMIT"
    assert len(v4) == 6
    v6 = plan.text(6).splitlines()
    assert len(v6) == 5
    assert "--dport 8080" in v6[3]


def test_plan_without_redirects_keeps_empty_chains() -> None:
    plan = IptablesNat("web", backend=Backend.NFT).plan([])
    expected = f"*nat\n:NETMIRROR-web - [0:0]\n{MARK_RULE}\nCOMMIT\n"
    assert plan.texts == {4: expected, 6: expected}
    assert plan.redirects == ()


def test_plan_only_managed_families() -> None:
    nat = IptablesNat("web", backend=Backend.NFT, families=(4,))
    plan = nat.plan([Redirect(80, 81, 4)])
    assert plan.families == (4,)
    with pytest.raises(FirewallError, match="IPv6"):
        nat.plan([Redirect(80, 81, 6)])


def test_plan_rejects_conflicting_targets() -> None:
    nat = IptablesNat("web", backend=Backend.NFT)
    with pytest.raises(FirewallError, match="both to 81 and 82"):
        nat.plan([Redirect(80, 81, 4), Redirect(80, 82, 4)])
    # The same port may go to different targets in different families.
    nat.plan([Redirect(80, 81, 4), Redirect(80, 82, 6)])


def test_plan_is_deterministic_and_comparable() -> None:
    nat = IptablesNat("web", backend=Backend.NFT)
    a = nat.plan([Redirect(1, 2, 4), Redirect(3, 4, 6)])
    b = nat.plan([Redirect(3, 4, 6), Redirect(1, 2, 4)])
    assert a == b
    assert hash(a) == hash(b)


def test_families_validated() -> None:
    with pytest.raises(ValueError):
        IptablesNat("web", backend=Backend.NFT, families=(4, 5))
    with pytest.raises(ValueError):
        IptablesNat("web", backend=Backend.NFT, families=())


SAMPLE_SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 03:36:09 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:NETMIRROR-notnat - [0:0]
-A NETMIRROR-notnat -p tcp -m tcp --dport 1 -j ACCEPT
COMMIT
# Completed on Fri Nov 27 03:36:09 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 03:36:09 2026
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:DOCKER - [0:0]
:NETMIRROR-web - [0:0]
:NETMIRROR-idle - [0:0]
:NETMIRROR-Bad_Name - [0:0]
-A PREROUTING -p tcp -m addrtype --dst-type LOCAL -j NETMIRROR-web
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -o lo -p tcp -j NETMIRROR-web
-A NETMIRROR-web -m mark --mark 0x4e4d -j RETURN
-A NETMIRROR-web -p tcp -m tcp --dport 80 -m comment --comment "netmirror session=web port=80" \
-j REDIRECT --to-ports 18080
-A NETMIRROR-web -p tcp -m tcp --dport 443 -m comment --comment "netmirror session=web port=443" \
-j REDIRECT --to-ports 18443
-A NETMIRROR-idle -m mark --mark 0x4e4d -j RETURN
-A NETMIRROR-Bad_Name -p tcp -m tcp --dport 9 -j REDIRECT --to-ports 10
-A DOCKER -i docker0 -j RETURN
COMMIT
# Completed on Fri Nov 27 03:36:09 2026
"""


def test_parse_sessions_sample() -> None:
    assert parse_sessions(SAMPLE_SAVE) == {"web": {80, 443}, "idle": set()}


def test_parse_sessions_reads_own_plan_output() -> None:
    plan = IptablesNat("api", backend=Backend.NFT).plan([Redirect(5000, 15000, 4)])
    text = plan.text(4).replace("*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n")
    assert parse_sessions(text) == {"api": {5000}}


@pytest.mark.parametrize(
    "text",
    ["", "# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n"],
)
def test_parse_sessions_empty(text: str) -> None:
    assert parse_sessions(text) == {}
    assert not tables_in_use(text)


def test_parse_sessions_tolerates_odd_quotes() -> None:
    text = (
        "*nat\n:NETMIRROR-x - [0:0]\n"
        '-A NETMIRROR-x -p tcp -m tcp --dport 7 -m comment --comment "unbalanced -j RETURN\n'
        "COMMIT\n"
    )
    assert parse_sessions(text) == {"x": {7}}


def test_tables_in_use() -> None:
    empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    assert not tables_in_use(empty)
    assert tables_in_use("*nat\n:PREROUTING ACCEPT [0:0]\n:MINE - [0:0]\nCOMMIT\n")
    assert tables_in_use("*filter\n:INPUT DROP [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n")
    assert tables_in_use(SAMPLE_SAVE)
