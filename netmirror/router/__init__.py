"""The HTTP router process: one per filtered port, in the target's network namespace.

Sessions that steal only the HTTP requests matching a filter share the port
through this process. :mod:`.router` owns the port's REDIRECT rule, the
registrations of the agents and the client connections; :mod:`.http1` and
:mod:`.http2` are the sans-I/O cores that relay one client connection, request by
request (HTTP/1.x) or stream by stream (HTTP/2), to the target's own server or to
a session. The filter itself is :mod:`netmirror.wire.httpfilter`. Run as
``python -m netmirror.router``.
"""
