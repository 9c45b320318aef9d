"""Whether a download can work: a short, bounded probe, so an offline machine gets a one-line error at once instead
of a minute of retries followed by a traceback."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from typing import Iterator


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to ``host`` opens within ``timeout`` seconds (name lookup included: it runs in a
    thread, since a hanging resolver ignores socket timeouts)."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_host() -> str:
    """The Hugging Face hub's host name (HF_ENDPOINT, when set, names a mirror)."""
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face hub reads from its local cache only, with no request (HF_HUB_OFFLINE=1). huggingface_hub reads
    the variable when it is imported, so an already imported hub has its setting switched too, and restored."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    previous = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous
