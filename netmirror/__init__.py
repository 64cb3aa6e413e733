"""netmirror: steal or mirror a target's TCP ports into a local process."""

__version__ = "0.1.0"
