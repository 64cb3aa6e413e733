"""The allocator keeps relay-sized buffers mapped instead of faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Allocates and frees relay-sized buffers (as reading a socket and framing does) and
# prints the minor page faults that cost.
CHURN = textwrap.dedent(
    """
    import resource, sys
    from netmirror.tasks import keep_heap_mapped
    if sys.argv[1] == "tuned" and not keep_heap_mapped():
        print("unsupported")
        raise SystemExit
    def churn(rounds):
        for _ in range(rounds):
            a = b"x" * (256 * 1024 + 9)
            b = a + b"y"
            del a, b
    churn(50)  # warm up: first touches count for both
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(2000)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, timeout=60
    )
    if out.stdout.strip() == "unsupported":
        pytest.skip("this C library has no mallopt(): the allocator is left as it is")
    return int(out.stdout)


def test_freed_buffers_are_reused_without_page_faults() -> None:
    default = faults("default")
    if default < 1000:
        pytest.skip(f"this allocator does not fault on such buffers ({default} faults)")
    tuned = faults("tuned")
    # Each default round maps fresh pages (64 per buffer); tuned rounds reuse them.
    assert tuned < default // 20, (tuned, default)
