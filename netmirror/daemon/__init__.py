"""The daemon: a background process per session, on the developer's machine.

:mod:`.daemon` starts the agent through the target (:mod:`.targets`), holds the
websocket tunnel to it, opens one local connection per stream, writes the pcap
file (:mod:`.pcap`) and answers ``status`` and ``down`` on the session's control
socket. :mod:`.exec` is what ``netmirror exec`` adds: the command's outgoing TCP,
DNS and proxy listeners. Run as ``netmirror daemon`` (:mod:`.main`).
"""
