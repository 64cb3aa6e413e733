"""``python -m sandbox create|delete NAME [--index N]``: a sandbox target by hand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from netmirror.errors import TargetError
from sandbox import Sandbox


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox create|delete NAME [--index N]``."""
    parser = argparse.ArgumentParser(prog="python -m sandbox")
    parser.add_argument("action", choices=["create", "delete"])
    parser.add_argument("name")
    parser.add_argument("--index", type=int, default=1)
    args = parser.parse_args(argv)
    box = Sandbox(args.name, index=args.index)
    try:
        if args.action == "create":
            box.create()
            print(f"created {box.target}: pod {box.pod_ip} / {box.pod_ip6}, host {box.host_ip}")
        else:
            box.destroy()
            print(f"deleted {box.netns}")
    except (TargetError, OSError, ValueError) as exc:
        print(f"netmirror sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


raise SystemExit(main())
