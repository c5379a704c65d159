"""Is the model hub reachable? A quick probe, so an offline machine fails in seconds, not after the hub client's retries."""

from __future__ import annotations

import socket


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host``:443 opens within ``timeout`` seconds (a DNS failure returns at once)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
