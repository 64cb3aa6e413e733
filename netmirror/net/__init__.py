"""Socket helpers every process of netmirror uses: no protocol, no policy.

:mod:`netmirror.net.sockets` reads a redirected connection's original destination,
resets connections, opens dual-stack listeners and marked outgoing connections.
"""
