"""Where in each period a MoERouter's periodic work falls: a fixed number per router.

MoERouters that start together (every one of them, when the operator starts) would otherwise resync,
re-read their history and refit their forecasts together, in bursts of API and Prometheus calls.
"""

from __future__ import annotations

import hashlib


def router_phase(namespace: str, name: str) -> float:
    """A number in [0, 1) fixed by a MoERouter's namespace and name, the same in every process and release."""
    digest = hashlib.blake2b(f"{namespace}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
