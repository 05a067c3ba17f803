"""Free TCP ports for child processes, never the same one twice."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port() -> int:
    """A port nothing listens on now, and one this process has not handed out before.

    A port is only taken once its user binds it, and the kernel may offer the
    same free port twice in a row: two workers started one after the other
    would then be given the same ``METRICS_PORT``, and the second could not start.
    """
    with _handed_out_lock:
        while True:
            port = _port_the_kernel_offers()
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def _port_the_kernel_offers() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
