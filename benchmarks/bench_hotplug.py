"""Per-event cost of vif-route-qubes online, and its start-up cost.

Run as root: ``.venv/bin/python benchmarks/bench_hotplug.py [--vms 50] [--rounds 5]``.
Everything happens in a throw-away network namespace. Prints ratios against
a baseline measured in the same run (absolute numbers vary by machine):

* online of one more vif with N VMs already up vs with 1 VM up — the
  anti-spoofing design promises a ratio near 1 (sets, not per-vif rules);
* importing python-iptables the way the hotplug path does (setuptools'
  distutils hook hidden) vs a plain ``import iptc``.

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyxs

from vif_hotplug.xenstored import XenStoreServer

BIN = Path(sys.executable).parent


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.ns = f"vhbench-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        self.sock = str(tmp / "xs.sock")
        (tmp / "netvm.conf").write_text("[netvm]\ngateway = 10.137.0.1\n")
        sh("ip", "netns", "add", self.ns)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def add_vif(self, domid: int) -> None:
        sh("ip", "-n", self.ns, "link", "add", f"vif{domid}.0", "type", "veth", "peer", "name", f"p{domid}")
        with pyxs.Client(unix_socket_path=self.sock) as c:
            base = f"/local/domain/0/backend/vif/{domid}/0"
            c.write(f"{base}/ip".encode(), f"10.137.{domid // 250}.{domid % 250 + 2}".encode())
            c.write(f"{base}/mac".encode(), f"00:16:3e:00:{domid // 256:02x}:{domid % 256:02x}".encode())

    def hotplug(self, command: str, domid: int, extra_env: dict[str, str] | None = None) -> float:
        env = dict(os.environ, XENSTORED_PATH=self.sock, VIF_HOTPLUG_CONF=str(self.tmp / "netvm.conf"),
                   VIF_HOTPLUG_LOCK=str(self.tmp / "lock"), XTABLES_LOCKFILE=str(self.tmp / "xt.lock"),
                   XENBUS_PATH=f"backend/vif/{domid}/0", vif=f"vif{domid}.0", **(extra_env or {}))
        start = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", self.ns, str(BIN / "vif-route-qubes"), command, "type_if=vif"],
                       env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def median_cycle(b: Bench, domid: int, rounds: int, extra_env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(rounds):
        times.append(b.hotplug("online", domid, extra_env))
        b.hotplug("offline", domid, extra_env)
    return statistics.median(times)


def import_time(code: str, rounds: int) -> float:
    """Median wall time of a fresh interpreter running ``code``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_hotplug: needs root (network namespaces)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="vhb"))
    server = XenStoreServer(str(tmp / "xs.sock"))
    server.start_in_thread()
    b = Bench(tmp)
    try:
        probe = 9000
        b.add_vif(probe)
        b.add_vif(1)
        b.hotplug("online", 1)
        base = median_cycle(b, probe, args.rounds)
        for domid in range(2, args.vms + 1):
            b.add_vif(domid)
            b.hotplug("online", domid)
        loaded = median_cycle(b, probe, args.rounds)
        plain = import_time("import iptc", args.rounds * 2)
        ours = import_time("from vif_hotplug.iptables_backend import load_iptc; load_iptc()", args.rounds * 2)
        print(f"online with 1 VM up (baseline):          {base * 1000:7.1f} ms")
        print(f"online with {args.vms:>3} VMs up:                 {loaded * 1000:7.1f} ms  ratio {loaded / base:.2f}")
        print(f"python + import iptc (plain, baseline):  {plain * 1000:7.1f} ms")
        print(f"python + load_iptc() (hook hidden):      {ours * 1000:7.1f} ms  ratio {ours / plain:.2f}")
    finally:
        b.close()
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
