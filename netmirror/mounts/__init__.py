"""Mount tables and private mount namespaces (shared by the CLI, the daemon and the agent).

:mod:`.table` reads mount tables, :mod:`.plan` decides (without I/O) which mounts put
the target's files at their own paths for one command, and :mod:`.namespace` makes
them in a mount namespace of the command's own.
"""
