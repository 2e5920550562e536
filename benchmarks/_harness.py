"""What both benchmarks share: throw-away netvms in network namespaces, timing, cleanup, reporting.

Standard library only: the benchmark process must not import the product (it
would share nothing with what it measures anyway, and an import error of
the package under edit must not stop a benchmark of an installed copy).

Everything is built in network namespaces named ``vhb<run>-<role>``; the
host's main namespace is never changed. Processes are started in their own
sessions and killed by pid; every namespace, process, temp dir and git
worktree is undone on success, failure, Ctrl-C and SIGTERM
(:class:`Cleanup`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().with_name("_runner.py")
WRAPPER = REPO / "etc/xen/scripts/vif-route-qubes"
XEN_VIF_ROUTE = Path("/etc/xen/scripts/vif-route")
NETBACK_MAC = "fe:ff:ff:ff:ff:ff"
GATEWAY = "10.137.0.1"
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
#: The environment ``xl devd`` gives a hotplug script besides the per-device variables.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- cleanup -------------------------------------------------------------------------------


class Cleanup:
    """Undo actions, last registered first; run on exit, error, Ctrl-C and SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        # A second Ctrl-C must not leave namespaces behind: ignore it while cleaning.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self._actions:
                what, action = self._actions.pop()
                try:
                    action()
                except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                    log(f"cleanup of {what} failed: {exc}")
        finally:
            signal.signal(signal.SIGINT, old)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def cleanup_on_exit() -> Iterator[Cleanup]:
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    c = Cleanup()
    try:
        yield c
    finally:
        log("cleaning up")
        c.run()


# --- processes ------------------------------------------------------------------------------


def sh(*cmd: str, input: str | None = None, check: bool = True, env: dict[str, str] | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)[:200]} exited {proc.returncode}: {proc.stderr.strip()[:2000]}")
    return proc


def kill_proc(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, one process we started (by its pid)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ensure_tools(needs: dict[str, str]) -> None:
    """``needs``: command name or absolute path -> Debian package; installs what is missing."""
    missing = sorted({pkg for tool, pkg in needs.items()
                      if not (os.path.exists(tool) if tool.startswith("/") else shutil.which(tool))})
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        sh("apt-get", "update", "-q", env=env, timeout=600)
        sh(*cmd, env=env, timeout=900)


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces, nftables, iptables)")


def machine_info(python: str) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    product_py = sh(python, "-I", "-S", "-c", "import sys; print(sys.version.split()[0])", check=False).stdout.strip()
    return {
        "uname_r": platform.release(),
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "python_product": f"{product_py} ({python})",
        "python_bench": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "commit": sh("git", "-C", str(REPO), "rev-parse", "--short", "HEAD", check=False).stdout.strip(),
        "worktree_dirty": bool(sh("git", "-C", str(REPO), "status", "--porcelain", "--", "vif_hotplug",
                                  check=False).stdout.strip()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- XenStore (just enough of the wire protocol: read, write, rm) ------------------------------

XS_READ, XS_WRITE, XS_RM, XS_ERROR = 2, 11, 13, 16
_HDR = struct.Struct("<IIII")


class XsClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self._req = 0

    def _call(self, op: int, payload: bytes) -> tuple[int, bytes]:
        self._req += 1
        self.sock.sendall(_HDR.pack(op, self._req, 0, len(payload)) + payload)
        hdr = self._recv(_HDR.size)
        kind, _req, _tx, length = _HDR.unpack(hdr)
        return kind, self._recv(length)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise OSError("xenstored closed the connection")
            data += chunk
        return data

    def write(self, path: str, value: str) -> None:
        kind, body = self._call(XS_WRITE, path.encode() + b"\0" + value.encode())
        if kind == XS_ERROR:
            raise OSError(f"xenstore write {path}: {body!r}")

    def read(self, path: str) -> str | None:
        kind, body = self._call(XS_READ, path.encode() + b"\0")
        return None if kind == XS_ERROR else body.decode()

    def rm(self, path: str) -> None:
        self._call(XS_RM, path.encode() + b"\0")

    def close(self) -> None:
        self.sock.close()


# --- statistics -----------------------------------------------------------------------------------


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def boot_ratio_ci(a: Sequence[float], b: Sequence[float], n: int = 2000, seed: int = 1) -> tuple[float, float]:
    """95 % bootstrap interval of median(a)/median(b)."""
    if not a or not b:
        return float("nan"), float("nan")
    rnd = random.Random(seed)
    ratios = sorted(
        statistics.median(rnd.choices(a, k=len(a))) / statistics.median(rnd.choices(b, k=len(b)))
        for _ in range(n)
    )
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


@dataclass
class Samples:
    """Per-event samples of one cell: wall and CPU seconds."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    agent_cpu: list[float] = field(default_factory=list)
    agent_ticks: list[int] = field(default_factory=list)

    def add(self, r: dict[str, Any]) -> None:
        client = r["utime"] + r["stime"]
        agent = (r.get("agent_cpu") or 0.0) + (r.get("agent_children_cpu") or 0.0)
        self.wall.append(r["wall"])
        self.client_cpu.append(client)
        self.agent_cpu.append(agent)
        self.cpu.append(client + agent)
        if r.get("agent_ticks") is not None:
            self.agent_ticks.append(r["agent_ticks"])

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.wall),
            "wall_p50_ms": p50(self.wall) * 1e3,
            "cpu_p50_ms": p50(self.cpu) * 1e3,
            "client_cpu_p50_ms": p50(self.client_cpu) * 1e3,
            "agent_cpu_p50_ms": p50(self.agent_cpu) * 1e3,
            "agent_stat_ms_mean": (statistics.mean(self.agent_ticks) * 1e3 / os.sysconf("SC_CLK_TCK")
                                   if self.agent_ticks else None),
            "wall_ms": [round(v * 1e3, 3) for v in self.wall],
            "cpu_ms": [round(v * 1e3, 3) for v in self.cpu],
        }


@dataclass
class Goal:
    name: str
    value: float
    baseline: float
    limit: float
    unit: str = "ms"
    op: str = "<="
    note: str = ""
    ci: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def passed(self) -> bool:
        return self.ratio <= self.limit if self.op == "<=" else self.ratio >= self.limit

    def row(self) -> list[str]:
        ci = f" [{self.ci[0]:.2f}-{self.ci[1]:.2f}]" if self.ci else ""
        return [self.name, f"{self.value:.2f} {self.unit}", f"{self.baseline:.2f} {self.unit}",
                f"{self.ratio:.2f}{ci}", f"{self.op} {self.limit:g}", "PASS" if self.passed else "FAIL"]

    def as_dict(self) -> dict[str, Any]:
        return {"goal": self.name, "value": self.value, "baseline": self.baseline, "unit": self.unit,
                "ratio": self.ratio, "limit": f"{self.op} {self.limit}", "pass": self.passed,
                "ratio_ci95": self.ci, "note": self.note}


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def print_goals(goals: Sequence[Goal]) -> None:
    """The goals' table and a count of those met ("(reported)" rows are shown, not counted)."""
    print()
    print(table(("goal", "measured", "baseline", "ratio [95% CI]", "limit", "result"), [g.row() for g in goals]))
    failed = [g for g in goals if not g.passed and "(reported)" not in g.name]
    counted = [g for g in goals if "(reported)" not in g.name]
    print(f"\n{len(counted) - len(failed)} of {len(counted)} goals met"
          f"{'' if not failed else ' (failed: ' + ', '.join(g.name for g in failed) + ')'}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    log(f"wrote {path}")


# --- namespaces, the runner, netvms ---------------------------------------------------------------


CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from vif_hotplug.entry import {function} as main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""
#: What the Debian package puts on PATH (/usr/bin): the thin client under ``python3 -I -S``,
#: imported from the directory that holds the package.
PATH_WRAPPER = """#!/bin/sh
exec "{prefix}/bin/python3" -I -S -c 'import sys; sys.path[0:0] = [sys.argv.pop(1)]; \
from vif_hotplug.agent import client; client.main()' "{site}" {tool} "$@"
"""
#: The fixed paths of ``etc/xen/scripts/vif-route-qubes`` (Debian's interpreter and package
#: directory), replaced by the emulated prefix's.
WRAPPER_PYTHON = "/usr/bin/python3"
WRAPPER_SITE = "/usr/lib/python3/dist-packages"
ENTRY_POINTS = {"vif-route-qubes": "vif_route_qubes", "vif-hotplug": "vif_hotplug",
                "qubes-setup-dnat-to-ns": "qubes_setup_dnat_to_ns"}


class Run:
    """One benchmark run: its id, temp dir, emulated install prefix and cleanup.

    The product is run from an install prefix in the run's temp dir, laid out
    as an install does (a virtualenv with the package, the console scripts,
    the thin wrappers on PATH, and the ``/etc/xen/scripts`` wrapper pointed at
    this prefix's interpreter and package directory). By default (``live=False``) the package in
    it is a byte-compiled copy of the work tree taken when the run starts, as
    ``pip install .`` would make: the agent imports lazily, and a package
    being edited while a benchmark runs would otherwise mix two versions in
    one process. ``live=True`` uses the work tree itself (the wrappers import
    the package from it, ``.venv``'s console scripts and its editable install).
    """

    def __init__(self, cleanup: Cleanup, venv_python: str, live: bool = False) -> None:
        self.cleanup = cleanup
        self.venv_python = venv_python
        self.live = live
        self.id = os.urandom(3).hex()
        # Short: Unix socket paths are limited to 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix=f"vhb{self.id}"))
        cleanup.push(f"temp dir {self.tmp}", lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.prefix = self.tmp / "prefix"
        self._install_prefix()
        #: The product's interpreter and console scripts.
        self.python = str(self.prefix / "bin/python3")
        self.bin = Path(venv_python).parent if live else self.prefix / "bin"
        self.wrapper = self.prefix / "vif-route-qubes"

    def _install_prefix(self) -> None:
        """PREFIX/bin/python3, a virtualenv (pyvenv.cfg, lib) with the package, and the wrappers.

        A bare ``bin/python3`` link would not be a virtualenv (Python finds
        ``pyvenv.cfg`` next to the link's own directory, not the target's),
        and the client's in-process fallback (``python3 -I -m
        vif_hotplug.entry``) would miss the package: so ``pyvenv.cfg`` and the
        site-packages come along.
        """
        venv = Path(self.venv_python).parent.parent
        p = self.prefix
        (p / "bin").mkdir(parents=True)
        os.symlink(self.venv_python, p / "bin/python3")
        shutil.copy(venv / "pyvenv.cfg", p / "pyvenv.cfg")
        if self.live:
            os.symlink(venv / "lib", p / "lib")
            site = REPO
        else:
            src_site = next((venv / "lib").glob("python3.*/site-packages"))
            site = p / "lib" / src_site.parent.name / "site-packages"
            site.mkdir(parents=True)
            for entry in src_site.iterdir():
                if entry.name.startswith(("__editable__", "vif_hotplug", "vif-hotplug")):
                    continue  # the editable install of the work tree: replaced by the copy below
                os.symlink(entry, site / entry.name)
            shutil.copytree(REPO / "vif_hotplug", site / "vif_hotplug",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            sh(self.venv_python, "-m", "compileall", "-q", str(site / "vif_hotplug"))
            for name, function in ENTRY_POINTS.items():
                script = p / "bin" / name
                script.write_text(CONSOLE_SCRIPT.format(python=p / "bin/python3", function=function))
                script.chmod(0o755)
        (p / "path").mkdir()
        for tool in ENTRY_POINTS:
            wrapper = p / "path" / tool
            wrapper.write_text(PATH_WRAPPER.format(prefix=p, site=site, tool=tool))
            wrapper.chmod(0o755)
        xen = WRAPPER.read_text()
        if WRAPPER_PYTHON not in xen or WRAPPER_SITE not in xen:
            raise RuntimeError(f"{WRAPPER}: its interpreter or package directory moved; update the harness")
        xen = xen.replace(WRAPPER_PYTHON, str(p / "bin/python3"))
        (p / "vif-route-qubes").write_text(xen.replace(WRAPPER_SITE, str(site)))
        (p / "vif-route-qubes").chmod(0o755)

    def netns(self, role: str) -> Netns:
        ns = Netns(f"vhb{self.id}-{role}")
        sh("ip", "netns", "add", ns.name)
        self.cleanup.push(f"netns {ns.name}", ns.delete)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def popen(self, argv: Sequence[str], what: str, **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(list(argv), start_new_session=True, **kw)
        self.cleanup.push(f"{what} (pid {proc.pid})", lambda: kill_proc(proc))
        return proc


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def enter(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def run(self, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(*self.enter(*cmd), check=check, input=input)

    def batch(self, lines: Iterable[str]) -> None:
        """``ip -batch`` in this namespace (thousands of links in one process)."""
        text = "\n".join(lines) + "\n"
        if text.strip():
            sh("ip", "-n", self.name, "-batch", "-", input=text)

    def delete(self) -> None:
        # Whatever still runs in it was started by this run (the namespace is ours).
        pids = sh("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", self.name, check=False)


class Runner:
    """:mod:`_runner` in a namespace."""

    def __init__(self, run: Run, ns: Netns) -> None:
        self.proc = run.popen(ns.enter(run.python, "-I", "-S", str(RUNNER)), f"runner in {ns.name}",
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the runner died")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"runner: {answer['error']}")
        return answer


def vm_ip(domid: int) -> str:
    return f"10.137.{domid // 250}.{domid % 250 + 2}"


def vm_mac(domid: int) -> str:
    return f"00:16:3e:{(domid >> 16) & 0xff:02x}:{(domid >> 8) & 0xff:02x}:{domid & 0xff:02x}"


class Netvm:
    """A driver domain in a namespace: its own XenStore, config, locks, state dir; optionally the agent.

    The VMs' ends of the vifs live in a second namespace (``-vms``), up, so
    every vif has carrier as a netback vif of a running VM has.
    """

    def __init__(self, run: Run, role: str, backend: str | None, conf: str | None = None,
                 uplink_addr: str = "192.0.2.1/24") -> None:
        self.run_ = run
        self.role = role
        self.backend = backend
        self.ns = run.netns(role)
        self.vms = run.netns(f"{role}v")
        self.tmp = run.tmp / role
        (self.tmp / "state").mkdir(parents=True)
        (self.tmp / "hooks").mkdir()
        (self.tmp / "out").mkdir()
        if conf is None:
            conf = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
            if backend:
                conf += f"\n[firewall]\nbackend = {backend}\n"
        (self.tmp / "netvm.conf").write_text(conf)
        self.xs_path = str(self.tmp / "xs.sock")
        self.xenstored = run.popen([str(run.bin / "vif-hotplug"), "xenstored", "--socket",
                                    self.xs_path], f"xenstored {role}", stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        _wait_for(lambda: os.path.exists(self.xs_path), f"xenstored of {role}", self.xenstored)
        self.xs = XsClient(self.xs_path)
        run.cleanup.push(f"xenstore client {role}", self.xs.close)
        self.agent: subprocess.Popen[Any] | None = None
        self.runner = Runner(run, self.ns)
        self.uplink = "uplink0"
        # An uplink with an address: what Xen's vif-route needs as netdev, and any netvm has.
        self.ns.batch([f"link add {self.uplink} type veth peer name wan0 netns {self.vms.name}",
                       f"addr add {uplink_addr} dev {self.uplink}", f"link set {self.uplink} up"])
        self.vms.batch(["link set wan0 up"])
        self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    # -- environment ---------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": BASE_PATH,
            "XENSTORED_PATH": self.xs_path,
            "VIF_HOTPLUG_CONF": str(self.tmp / "netvm.conf"),
            "VIF_HOTPLUG_LOCK": str(self.tmp / "hotplug.lock"),
            "VIF_HOTPLUG_STATE_DIR": str(self.tmp / "state"),
            "VIF_HOTPLUG_HOOKS_DIR": str(self.tmp / "hooks"),
            "XTABLES_LOCKFILE": str(self.tmp / "xtables.lock"),
        }

    def toolstack_env(self, domid: int, script: str, netdev: str = "", **extra: str) -> dict[str, str]:
        return {
            **self.env,
            "XENBUS_PATH": f"backend/vif/{domid}/0",
            "XENBUS_TYPE": "vif",
            "XENBUS_BASE_PATH": "backend",
            "vif": f"vif{domid}.0",
            "script": script,
            "netdev": netdev,
            **extra,
        }

    # -- topology ----------------------------------------------------------------------------

    def add_vifs(self, domids: Sequence[int], vm_ns: Netns | None = None) -> None:
        """veths ``vifD.0`` (netback's MAC) and libxl's XenStore entries.

        The VM ends (``eD``) go to ``vm_ns`` (default: the shared ``-vms`` namespace), up.
        """
        where = vm_ns or self.vms
        self.ns.batch(
            f"link add vif{d}.0 address {NETBACK_MAC} type veth peer name e{d} address {vm_mac(d)} "
            f"netns {where.name}" for d in domids
        )
        where.batch(f"link set e{d} up" for d in domids)
        for d in domids:
            base = f"/local/domain/0/backend/vif/{d}/0"
            for key, value in {
                "frontend": f"/local/domain/{d}/device/vif/0", "frontend-id": str(d), "online": "1",
                "state": "4", "script": "/etc/xen/scripts/vif-route-qubes", "mac": vm_mac(d),
                "ip": vm_ip(d), "type": "vif", "handle": "0",
            }.items():
                self.xs.write(f"{base}/{key}", value)

    def status(self, domid: int) -> str | None:
        return self.xs.read(f"/local/domain/0/backend/vif/{domid}/0/hotplug-status")

    def clear_status(self, domids: Iterable[int]) -> None:
        for d in domids:
            self.xs.rm(f"/local/domain/0/backend/vif/{d}/0/hotplug-status")
            self.xs.rm(f"/local/domain/0/backend/vif/{d}/0/hotplug-error")

    # -- the product ---------------------------------------------------------------------------

    def start_agent(self) -> None:
        self.agent = self.run_.popen(
            self.ns.enter(str(self.run_.bin / "vif-hotplug"), "agent", "--no-start-up"), f"agent {self.role}",
            env={**self.env, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "agent.log", "w"),
        )
        sock = self.tmp / "state" / "agent.sock"
        _wait_for(sock.exists, f"agent of {self.role}", self.agent, 60)

    @property
    def agent_pid(self) -> int | None:
        # nsenter without --fork execs the agent: same pid.
        return self.agent.pid if self.agent is not None else None

    def wrapper(self, command: str, domid: int, agent: bool = True, **extra: str) -> dict[str, Any]:
        """The toolstack's call of /etc/xen/scripts/vif-route-qubes (the wrapper, from the emulated prefix)."""
        env = self.toolstack_env(domid, "/etc/xen/scripts/vif-route-qubes", **extra)
        if not agent:
            env["VIF_HOTPLUG_AGENT"] = "off"
        return {"argv": [str(self.run_.wrapper), command, "type_if=vif"], "env": env,
                "out": str(self.tmp / "out" / f"{command}-{domid}.log")}

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``vif-hotplug ARGS`` in this netvm, in-process (setup, not measured)."""
        proc = sh(*self.ns.enter(str(self.run_.bin / "vif-hotplug"), *args), check=False,
                  env={**os.environ, **self.env, "VIF_HOTPLUG_AGENT": "off"})
        if check and proc.returncode != 0:
            raise RuntimeError(f"vif-hotplug {' '.join(args)} in {self.role}: {proc.returncode} {proc.stderr}")
        return proc

    def timed(self, job: dict[str, Any], expect: int | Sequence[int] = 0, agent: bool = True) -> dict[str, Any]:
        r = self.runner.call({"op": "run", **job, "agent_pid": self.agent_pid if agent else None})
        ok = (expect,) if isinstance(expect, int) else tuple(expect)
        if r["rc"] not in ok:
            out = Path(job["out"]).read_text(errors="replace")[-2000:] if job.get("out") else ""
            raise RuntimeError(f"{' '.join(job['argv'][:4])} in {self.role} exited {r['rc']} "
                               f"(expected {expect}): {out}")
        return r

    def storm(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        return self.runner.call({"op": "storm", "jobs": jobs, "agent_pid": self.agent_pid})

    def bring_online(self, domids: Sequence[int], parallel: int = 16) -> float:
        """Online every vif of ``domids`` through the agent (``parallel`` wrapper processes at a time)."""
        t0 = time.perf_counter()
        for i in range(0, len(domids), parallel):
            chunk = domids[i:i + parallel]
            r = self.storm([self.wrapper("online", d) for d in chunk])
            bad = [(d, rc) for d, rc in zip(chunk, r["rcs"], strict=True) if rc != 0]
            if bad:
                d = bad[0][0]
                raise RuntimeError(f"online failed in {self.role} for {bad[:5]}: "
                                   f"{(self.tmp / 'out' / f'online-{d}.log').read_text()[-1500:]}")
        return time.perf_counter() - t0


def _wait_for(cond: Callable[[], bool], what: str, proc: subprocess.Popen[Any] | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


def old_worktree(run: Run, commit: str) -> Path:
    """``git worktree add --detach`` of ``commit`` in the run's temp dir; removed afterwards."""
    path = run.tmp / f"old-{commit}"
    sh("git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit)

    def remove() -> None:
        sh("git", "-C", str(REPO), "worktree", "remove", "--force", str(path), check=False)
        sh("git", "-C", str(REPO), "worktree", "prune", check=False)

    run.cleanup.push(f"worktree {path}", remove)
    return path


def rotate(items: Sequence[Any], i: int) -> list[Any]:
    """The variants of round ``i``, rotated so that none always runs first (A B C, B C A, ...)."""
    k = i % len(items)
    return list(items[k:]) + list(items[:k])


# --- the interleaved loop ---------------------------------------------------------------------

Record = Callable[[str, dict[str, Any]], None]
Variant = tuple[str, Callable[[Record], None]]


class Cells(dict[str, Samples]):
    def recorder(self, active: bool) -> Record:
        def record(name: str, result: dict[str, Any]) -> None:
            if active:
                self.setdefault(name, Samples()).add(result)
            else:
                self.warmup.setdefault(name, []).append(result["wall"] * 1e3)

        return record

    def __init__(self) -> None:
        super().__init__()
        self.warmup: dict[str, list[float]] = {}

    def rows(self) -> list[list[str]]:
        return [[name, str(len(s.wall)), f"{p50(s.wall) * 1e3:.1f}", f"{p50(s.cpu) * 1e3:.1f}",
                 f"{p50(s.client_cpu) * 1e3:.1f}", f"{p50(s.agent_cpu) * 1e3:.1f}",
                 f"{min(s.wall) * 1e3:.1f}", f"{max(s.wall) * 1e3:.1f}"]
                for name, s in self.items()]

    HEADERS = ("cell", "n", "wall p50 ms", "cpu p50 ms", "client cpu", "agent cpu", "min", "max")

    def as_dict(self) -> dict[str, Any]:
        return {"cells": {k: v.summary() for k, v in self.items()},
                "warmup_wall_ms": self.warmup}


def interleave(variants: Sequence[Variant], n: int, warmup: int, cells: Cells,
               extra: Callable[[int, Record], None] | None = None) -> None:
    """``warmup`` unrecorded rounds, then ``n`` rounds; each round runs every variant once, rotated."""
    total = warmup + n
    for i in range(total):
        t0 = time.perf_counter()
        record = cells.recorder(i >= warmup)
        for _name, fn in rotate(variants, i):
            fn(record)
        if extra is not None and i >= warmup:
            extra(i - warmup, record)
        log(f"round {i + 1}/{total}{' (warm-up)' if i < warmup else ''}: {time.perf_counter() - t0:.1f} s, "
            f"load {os.getloadavg()[0]:.1f}")
