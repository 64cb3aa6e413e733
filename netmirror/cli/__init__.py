"""The ``netmirror`` command line: the developer's side of every session.

:mod:`.commands` parses the arguments and runs ``up``, ``exec``, ``down``,
``status``, ``logs``, ``ls`` and ``config``. It is the only place that turns errors
into exit codes and one-line messages. The CLI starts a session's daemon and
talks to it through the session's directory and control socket
(:mod:`netmirror.wire.session`), never by importing it.
"""

from netmirror.cli.commands import main

__all__ = ["main"]
