"""A kubeconfig exec credential plugin whose tokens expire after a few seconds.

    python token_plugin.py SECRET_FILE LIFETIME_SECONDS COUNT_FILE

It prints an ``ExecCredential`` (client.authentication.k8s.io/v1beta1) with a token
``EXPIRY.SIGNATURE`` that :func:`valid` accepts until EXPIRY, and counts its runs in
COUNT_FILE, one line a run. The test API server checks every request with
:func:`valid`, as a real one checks the tokens EKS or GKE plugins hand out.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path


def sign(secret: bytes, expiry: int) -> str:
    return hmac.new(secret, str(expiry).encode(), hashlib.sha256).hexdigest()


def issue(secret: bytes, lifetime: float) -> tuple[str, int]:
    expiry = int(time.time() + lifetime)
    return f"{expiry}.{sign(secret, expiry)}", expiry


def valid(secret: bytes, authorization: str) -> bool:
    """Whether an ``Authorization`` header carries a token of ours that has not expired."""
    token = authorization.removeprefix("Bearer ").strip()
    expiry, _, signature = token.partition(".")
    if not expiry.isdigit() or not hmac.compare_digest(signature, sign(secret, int(expiry))):
        return False
    return time.time() < int(expiry)


def main() -> int:
    secret_file, lifetime, count_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    token, expiry = issue(Path(secret_file).read_bytes(), lifetime)
    with open(count_file, "a") as count:
        count.write(f"{time.time():.3f}\n")
    stamp = datetime.datetime.fromtimestamp(expiry, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        json.dumps(
            {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "kind": "ExecCredential",
                "status": {"token": token, "expirationTimestamp": stamp},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
