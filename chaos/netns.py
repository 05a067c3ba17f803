"""A host that can vanish from the network: a network namespace of the suite's own, joined by a veth pair.

A worker started with :meth:`CutOffHost.wrap` runs inside the namespace and
reaches PostgreSQL at :attr:`CutOffHost.host_ip`, across the veth pair.
:meth:`CutOffHost.cut` takes the namespace's end of the pair down: from then
on its packets are dropped silently, with no FIN and no RST, as when a
machine loses its network or dies. The server notices only through TCP
(keepalives, ``tcp_user_timeout``), which is what the host-cut measurement
is about. Needs root (CAP_NET_ADMIN) and ``ip`` from iproute2.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType


class NetnsUnavailable(RuntimeError):
    """This machine cannot make network namespaces (not root, or no ``ip``)."""


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")


def why_unavailable() -> str | None:
    """Why :class:`CutOffHost` cannot work here, or None when it can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


class CutOffHost:
    """A network namespace with a veth pair to this host; :meth:`cut` and :meth:`restore` its link."""

    def __init__(self) -> None:
        reason = why_unavailable()
        if reason is not None:
            raise NetnsUnavailable(reason)
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.netns = f"pjcut{tag}"
        # Interface names are at most 15 characters.
        self._host_if, self._ns_if = f"pjh{tag}", f"pjn{tag}"
        octet = random.randrange(0, 64) * 4
        subnet = f"10.231.{random.randrange(256)}"
        self.host_ip, self.ns_ip = f"{subnet}.{octet + 1}", f"{subnet}.{octet + 2}"
        self.subnet = f"{subnet}.{octet}/30"
        self.is_cut = False
        self._made = False

    def create(self) -> None:
        _ip("netns", "add", self.netns)
        self._made = True
        _ip("link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
        _ip("link", "set", self._ns_if, "netns", self.netns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self._host_if)
        _ip("link", "set", self._host_if, "up")
        _ip("addr", "add", f"{self.ns_ip}/30", "dev", self._ns_if, netns=self.netns)
        _ip("link", "set", self._ns_if, "up", netns=self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Drop every packet between the namespace and the host, silently."""
        _ip("link", "set", self._ns_if, "down", netns=self.netns)
        self.is_cut = True

    def restore(self) -> None:
        _ip("link", "set", self._ns_if, "up", netns=self.netns)
        self.is_cut = False

    def close(self) -> None:
        if not self._made:
            return
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True, check=False, timeout=30)
        self._made = False

    def __enter__(self) -> CutOffHost:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
