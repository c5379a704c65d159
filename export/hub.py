"""Is the model hub reachable? A quick probe, so an offline machine fails in seconds, not after the hub client's retries."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub's host (huggingface_hub's endpoint) opens on port 443 within ``timeout``
    seconds (a DNS failure returns at once)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
