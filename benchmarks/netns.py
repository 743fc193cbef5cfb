"""Two network namespaces joined by a rate-limited veth pair: a real link between two
processes on one machine.

:class:`NamespaceLink` creates namespaces ``<prefix><pid>a`` and ``<prefix><pid>b``, moves one
end of a veth pair into each, addresses them ``SUBNET.1`` and ``SUBNET.2`` and brings them up.
:meth:`NamespaceLink.set_rate` puts a token-bucket filter on the egress of each end (``tc qdisc
... tbf rate R burst B latency 50ms``; netem is not needed), so every byte between the two
sides crosses a link of rate R in each direction; :meth:`~NamespaceLink.dropped_packets` reads
what tbf dropped. Processes run inside with :meth:`~NamespaceLink.exec_argv`. The TCP
congestion control can be chosen per namespace (a per-namespace sysctl: the host's setting is
untouched). Only the two addresses inside the namespaces are used.

Needs root, ``ip`` and ``tc`` (:func:`netns_available` says whether this process has them).
Used as a context manager the namespaces are deleted on exit, whatever happened inside;
:meth:`NamespaceLink.remove_stale` deletes ones left by a crashed earlier run (whose pid is
gone). ``benchmarks/link.py`` runs its two ranks over such a link.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

NS_PREFIX = "cflink"
SUBNET = "10.231.77"  # only ever used inside the namespaces this module creates
TBF_LATENCY_MS = 50


def tbf_burst_bytes(mbit: float) -> int:
    """4 ms of traffic at the rate, at least 64 KiB: large enough for a GSO segment and for the
    qdisc watchdog not to throttle below the rate, small against one layer's message."""
    return max(64 * 1024, int(mbit * 1e6 / 8 * 0.004))


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def netns_available() -> tuple[bool, str]:
    """Whether this process can create namespaces and rate-limit a veth pair."""
    if os.geteuid() != 0:
        return False, "not running as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found"
    try:
        _run(["ip", "netns", "list"])
    except (subprocess.SubprocessError, OSError) as exc:
        return False, f"`ip netns` unavailable: {exc}"
    return True, ""


class NamespaceLink:
    """Two namespaces ``<prefix><pid>a`` / ``b`` joined by a veth pair, one rank in each.

    Use as a context manager: the namespaces (and with them the veth pair) are deleted on exit,
    whatever happened inside.
    """

    def __init__(self, prefix: str = NS_PREFIX, tcp_cc: str | None = None):
        tag = f"{prefix}{os.getpid()}"
        self.ns = (f"{tag}a", f"{tag}b")
        self.dev = self.ns  # interface names (<= 15 chars) equal to the namespace names
        self.addr = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.burst: int | None = None
        self.tcp_cc_wanted = tcp_cc  # TCP congestion control in the namespaces (None: inherit)
        self.tcp_cc: str | None = None  # the one in use

    @staticmethod
    def remove_stale(prefix: str = NS_PREFIX) -> list[str]:
        """Delete namespaces (and stray veths) named ``<prefix><pid>[ab]`` whose pid is gone."""
        removed = []
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)[ab]\b")
        listings = (
            _run(["ip", "netns", "list"], check=False).stdout.splitlines(),
            [
                line.split(":")[1].strip().split("@")[0]
                for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines()
                if line.count(":") >= 2
            ],
        )
        for kind, names in zip(("netns", "link"), listings, strict=True):
            for line in names:
                m = pattern.match(line.strip())
                if not m or _pid_alive(int(m.group(1))):
                    continue
                name = line.split()[0]
                cmd = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del"]
                if kind == "link":
                    cmd.append(name)
                if _run(cmd, check=False).returncode == 0:
                    removed.append(name)
        return removed

    def __enter__(self) -> NamespaceLink:
        try:
            for ns in self.ns:
                _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1]])
            for ns, dev, addr in zip(self.ns, self.dev, self.addr, strict=True):
                _run(["ip", "link", "set", dev, "netns", ns])
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                self._set_tcp_cc(ns)
        except BaseException:
            self.close()
            raise
        return self

    def _set_tcp_cc(self, ns: str) -> None:
        """Choose the namespace's TCP congestion control (a per-namespace sysctl: the host's
        setting is untouched); on refusal keep the inherited one, and record what is used."""
        key = "net.ipv4.tcp_congestion_control"
        if self.tcp_cc_wanted:
            setting = f"{key}={self.tcp_cc_wanted}"
            done = _run(["ip", "netns", "exec", ns, "sysctl", "-qw", setting], check=False)
            if done.returncode != 0:
                print(
                    f"[link] could not set {setting} in {ns} ({done.stderr.strip()}); "
                    "keeping the inherited one"
                )
        self.tcp_cc = _run(["ip", "netns", "exec", ns, "sysctl", "-n", key]).stdout.strip()

    def set_rate(self, mbit: float) -> None:
        """Rate-limit both directions (egress of each end) to ``mbit``; inf removes the limit."""
        for ns, dev in zip(self.ns, self.dev, strict=True):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            if not math.isinf(mbit):
                self.burst = tbf_burst_bytes(mbit)
                _run([
                    "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", f"{mbit * 1000:.0f}kbit", "burst", str(self.burst),
                    "latency", f"{TBF_LATENCY_MS}ms",
                ])  # fmt: skip
        if math.isinf(mbit):
            self.burst = None

    def dropped_packets(self) -> int | None:
        """Packets the two tbf qdiscs dropped since ``set_rate`` (queue over ``latency``)."""
        total = 0
        for ns, dev in zip(self.ns, self.dev, strict=True):
            out = _run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev], check=False).stdout
            m = re.search(r"qdisc tbf .*?dropped (\d+)", out, re.S)
            if m is None:
                return None
            total += int(m.group(1))
        return total

    def exec_argv(self, side: int, argv: list[str]) -> list[str]:
        """``argv`` as a command that runs inside namespace ``side`` (0 or 1)."""
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def close(self) -> None:
        """Delete both namespaces (and with them the veth pair); safe to call twice."""
        for ns in self.ns:
            _run(["ip", "netns", "del", ns], check=False)
        _run(["ip", "link", "del", self.dev[0]], check=False)  # if it never moved

    def __exit__(self, *exc) -> None:
        self.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
