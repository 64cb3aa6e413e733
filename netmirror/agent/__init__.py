"""The agent: runs in the target's network namespace and hands its traffic over.

:mod:`.main` starts it (enters the namespace, sets up the firewall and its guard);
:mod:`.agent` serves the daemon's tunnel and the ports it subscribes;
:mod:`.bridges` turns connections into streams and back; :mod:`.mirror` copies
traffic (by :mod:`.capture` of packets, or by passthrough); :mod:`.share` joins the
port's HTTP router for filtered steals; :mod:`.resolver` and
:mod:`.target_process` answer as the target's own process would. Run as
``netmirror agent``.
"""
