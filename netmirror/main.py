"""The ``netmirror`` executable: one name for every process netmirror runs.

``netmirror agent ...`` runs the agent (in the target), ``netmirror daemon ...`` a
session's daemon (started by ``up``), everything else is the CLI. Each process's
package is imported only for its own command, so the agent never loads the CLI
or the daemon, and the other way round.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from netmirror.errors import NetmirrorError

#: Options the CLI takes before its command, which also apply to the agent and daemon.
_GLOBAL_FLAGS = ("--debug",)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the process that ``argv`` names; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    flags = []
    while args and args[0] in _GLOBAL_FLAGS:
        flags.append(args.pop(0))
    command = args[0] if args else ""
    debug = "--debug" in flags
    if command == "agent":
        from netmirror.agent.main import main as agent_main

        return _guarded(lambda: agent_main(args[1:], debug=debug))
    if command == "daemon":
        from netmirror.daemon.main import main as daemon_main

        return _guarded(lambda: daemon_main(args[1:], debug=debug))
    from netmirror.cli import main as cli_main

    return cli_main([*flags, *args])


def _guarded(run: Callable[[], int]) -> int:
    """The agent's and daemon's errors as the CLI gives them: one line and an exit code."""
    try:
        return run()
    except NetmirrorError as exc:
        sys.stderr.write(f"netmirror: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("netmirror: interrupted\n")
        return 130
    except BrokenPipeError:  # whoever read our output went away
        return 0
