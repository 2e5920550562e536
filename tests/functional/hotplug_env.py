"""A netvm in a namespace, an embedded XenStore, and VMs behind veth "vifs".

The harness runs the installed ``vif-route-qubes`` exactly as the toolstack
would (in the netvm's network namespace, with ``XENBUS_PATH`` and ``vif`` in
the environment) and reads kernel state back with the distribution's own
tools (:mod:`.kernel_state`), never with our adapters. Each netvm uses one
firewall backend (the ``backend`` fixture runs every test once per backend).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyxs

from tests.xenbus_double.double import XenbusDouble
from vif_hotplug.core.model import NETBACK_MAC as NETBACK_MAC  # re-exported for the tests
from vif_hotplug.lab.probe import listen_udp_argv, send_udp_argv
from vif_hotplug.lab.topology import backend_link_commands, guest_commands
from vif_hotplug.lab.xenstored import XenStoreServer

from .conftest import Netns, NetnsFactory, entry_point, require_tool
from .kernel_state import FirewallState, read_firewall

GATEWAY = "10.137.0.1"
GATEWAY6 = "fd09:24ef:4179::a89:1"
UPLINK_NET = "192.0.2"
UPLINK6_NET = "fd00:2"
VM6_NET = "fd09:24ef:4179"
#: The VM's end of its vif (any name but eth0 would do: nothing may depend on it).
VM_DEV = "vmnic0"


FAULT_FILE = "/run/vif-hotplug-faults.json"


@contextlib.contextmanager
def fault(netvm: Netvm, command: str, when: str, index: int, where: str = "local") -> Iterator[None]:
    """Arm the test-only fault of ``vif_hotplug.app.faults`` for this netvm while the block runs.

    The file is shared by every netvm on this machine (test runs side by
    side): lines are scoped by state directory, added and removed under a lock.
    """
    import fcntl
    import json

    line = json.dumps({"state_dir": netvm.env["VIF_HOTPLUG_STATE_DIR"], "command": command, "when": when,
                       "index": index, "where": where})

    def edit(change: Callable[[list[str]], list[str]]) -> None:
        with open(FAULT_FILE + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                lines = Path(FAULT_FILE).read_text().splitlines()
            except FileNotFoundError:
                lines = []
            lines = change(lines)
            tmp = f"{FAULT_FILE}.{os.getpid()}.tmp"
            Path(tmp).write_text("".join(f"{x}\n" for x in lines))
            os.chmod(tmp, 0o600)
            os.replace(tmp, FAULT_FILE)

    edit(lambda lines: [x for x in lines if json.loads(x)["state_dir"] != netvm.env["VIF_HOTPLUG_STATE_DIR"]]
         + [line])
    try:
        yield
    finally:
        edit(lambda lines: [x for x in lines if x != line])


@dataclass
class Vm:
    domid: int
    ns: Netns
    ips: list[str]

    @property
    def vif(self) -> str:
        return f"vif{self.domid}.0"

    @property
    def ip(self) -> str:
        return self.ips[0]


@dataclass
class Netvm:
    factory: NetnsFactory
    ns: Netns
    tmp: Path
    xs_path: str
    fw_backend: str
    vms: dict[int, Vm] = field(default_factory=dict)
    uplink: Netns | None = None
    #: The resident agent serving this netvm's events, when the test runs with one.
    agent: subprocess.Popen[str] | None = None
    #: The embedded xenstored, for tests that make it refuse a request (``answer_with_error``).
    xenstored: XenStoreServer | None = None
    #: A mount namespace whose /dev/xen/xenbus reaches the store (a driver domain's way): commands run
    #: there, with no XENSTORED_PATH and no daemon socket. See :func:`running_netvm`.
    mount_ns: str | None = None
    #: The double behind that device (its ``violations`` say whether a command broke the driver's rules).
    xenbus: XenbusDouble | None = None

    # --- configuration ------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {
            **({} if self.mount_ns else {"XENSTORED_PATH": self.xs_path}),
            "VIF_HOTPLUG_CONF": str(self.tmp / "netvm.conf"),
            "VIF_HOTPLUG_LOCK": str(self.tmp / "hotplug.lock"),
            "VIF_HOTPLUG_HOOKS_DIR": str(self.tmp / "hooks"),
            "VIF_HOTPLUG_STATE_DIR": str(self.tmp / "state"),
            "XTABLES_LOCKFILE": str(self.tmp / "xtables.lock"),
            # Without an agent of the test's own, clients never use one.
            **({} if self.agent is not None else {"VIF_HOTPLUG_AGENT": "off"}),
        }

    @property
    def agent_socket(self) -> Path:
        return self.tmp / "state" / "agent.sock"

    def start_agent(self, *args: str) -> subprocess.Popen[str]:
        """``vif-hotplug agent`` in this netvm (as systemd would start it), ready when this returns."""
        env = {k: v for k, v in {**os.environ, **self.env}.items() if k != "VIF_HOTPLUG_AGENT"}
        proc = subprocess.Popen(
            [*self._nsenter(), entry_point("vif-hotplug"), "agent", *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.agent = proc
        deadline = time.monotonic() + 30
        while not self.agent_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.02)
        return proc

    def stop_agent(self) -> None:
        proc, self.agent = self.agent, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def write_conf(self, text: str) -> None:
        """netvm.conf as given, with this netvm's firewall backend added."""
        if "[firewall]" not in text:
            text += f"\n[firewall]\nbackend = {self.fw_backend}\n"
        (self.tmp / "netvm.conf").write_text(text)

    def firewall(self) -> FirewallState:
        """The firewall as the backend in use holds it, backend-independent."""
        return read_firewall(lambda *cmd: self.ns.run(*cmd), self.fw_backend)

    def xs_write(self, path: str, value: str) -> None:
        with pyxs.Client(unix_socket_path=self.xs_path) as c:
            if value == "":
                c.mkdir(path.encode())
            else:
                c.write(path.encode(), value.encode())

    def xs_read(self, path: str) -> str | None:
        with pyxs.Client(unix_socket_path=self.xs_path) as c:
            try:
                return str(c.read(path.encode()).decode())
            except pyxs.PyXSError:
                return None

    def xs_rm(self, path: str) -> None:
        with pyxs.Client(unix_socket_path=self.xs_path) as c:
            c.delete(path.encode())

    def backend(self, domid: int) -> str:
        return f"/local/domain/0/backend/vif/{domid}/0"

    # --- topology -----------------------------------------------------------

    def add_vm(
        self, domid: int, ips: list[str] | None = None, mac: str | None = None, extra: dict[str, str] | None = None,
        make_link: bool = True, vm_view: tuple[str, str] | None = None,
    ) -> Vm:
        """A VM namespace, the veth standing in for netback's vif, and libxl's XenStore entries."""
        ips = ips or [f"10.137.0.{domid}"]
        mac = mac or f"00:16:3e:5e:6c:{domid % 256:02x}"
        vm_ns = self.factory("vhvm")
        vm = Vm(domid, vm_ns, ips)
        if make_link:
            # A VM with a mapped address believes in other addresses than ours.
            own_ips, gateway = ([vm_view[0]], vm_view[1]) if vm_view else (ips, GATEWAY)
            steps = backend_link_commands(self.ns.name, vm.vif, mac, vm_ns.name, VM_DEV)
            steps += guest_commands(vm_ns.name, own_ips, gateway, GATEWAY6, VM_DEV)
            for ns, argv in steps:
                subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)
        base = self.backend(domid)
        entries = {
            "frontend": f"/local/domain/{domid}/device/vif/0",
            "frontend-id": str(domid),
            "online": "1",
            "state": "2",
            "script": "/etc/xen/scripts/vif-route-qubes",
            "mac": mac,
            "ip": " ".join(ips),
            "type": "vif",
            "handle": "0",
        }
        entries.update(extra or {})
        for key, value in entries.items():
            if value is not None:
                self.xs_write(f"{base}/{key}", value)
        self.vms[domid] = vm
        return vm

    def add_uplink(self) -> Netns:
        """An "uplink" namespace routed to the netvm through ``uplink0`` (never eth0)."""
        up = self.factory("vhup")
        self.ns.run("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "wan0")
        self.ns.run("ip", "link", "set", "wan0", "netns", up.name)
        self.ns.run("ip", "addr", "add", f"{UPLINK_NET}.1/24", "dev", "uplink0")
        self.ns.run("ip", "link", "set", "uplink0", "up")
        up.run("ip", "addr", "add", f"{UPLINK_NET}.2/24", "dev", "wan0")
        up.run("ip", "link", "set", "wan0", "up")
        # No NAT here: the uplink routes the VM range back, so it sees real sources.
        up.run("ip", "route", "add", "10.137.0.0/16", "via", f"{UPLINK_NET}.1")
        self.ns.run("ip", "route", "add", "default", "via", f"{UPLINK_NET}.2")
        self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns.run("ip", "addr", "add", f"{UPLINK6_NET}::1/64", "dev", "uplink0", "nodad")
        up.run("ip", "addr", "add", f"{UPLINK6_NET}::2/64", "dev", "wan0", "nodad")
        up.run("ip", "-6", "route", "add", f"{VM6_NET}::/64", "via", f"{UPLINK6_NET}::1")
        self.ns.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.uplink = up
        return up

    # --- running the hotplug script ------------------------------------------

    def hotplug(self, command: str, domid: int | None = None, *args: str, env: dict[str, str] | None = None,
                check: bool = True, vif: str | None = None) -> subprocess.CompletedProcess[str]:
        """``vif-route-qubes COMMAND type_if=vif`` as libxl runs it for ``domid``."""
        full = dict(self.env)
        if domid is not None:
            full.update({
                "XENBUS_PATH": f"backend/vif/{domid}/0",
                "XENBUS_TYPE": "vif",
                "XENBUS_BASE_PATH": "backend",
                "vif": vif or f"vif{domid}.0",
                "script": "/etc/xen/scripts/vif-route-qubes",
                "netdev": "",
            })
        full.update(env or {})
        argv = args if args else ("type_if=vif",)
        # nsenter, not "ip netns exec": the toolstack runs us in the driver
        # domain's own mount namespace, where a NAT namespace we name stays
        # named after we exit; ip netns exec would give us a private one.
        run_env = dict(os.environ)
        run_env.update(full)
        proc = subprocess.run(
            [*self._nsenter(), entry_point("vif-route-qubes"), command, *argv],
            capture_output=True, text=True, env=run_env, timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"vif-route-qubes {command} {domid} exited {proc.returncode}: {proc.stderr}")
        return proc

    def tool(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``vif-hotplug ARGS`` (init, stop, reconcile, status...) in the netvm, with its environment."""
        run_env = dict(os.environ)
        run_env.update(self.env)
        run_env.update(env or {})
        proc = subprocess.run(
            [*self._nsenter(), entry_point("vif-hotplug"), *args],
            capture_output=True, text=True, env=run_env, timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"vif-hotplug {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def _nsenter(self) -> list[str]:
        mount = [f"--mount={self.mount_ns}"] if self.mount_ns else []
        return ["nsenter", f"--net=/run/netns/{self.ns.name}", *mount]

    def sysctl(self, key: str) -> str:
        return self.ns.run("cat", f"/proc/sys/{key}").stdout.strip()

    def settle(self, domid: int) -> None:
        """Wait until the hooks of ``domid``'s last event have run.

        In-process they ran before the command exited; an agent runs them
        after answering, before the next request of the same vif: a no-op
        ``add`` event queues behind them.
        """
        self.hotplug("add", domid)

    def status(self, domid: int) -> str | None:
        return self.xs_read(f"{self.backend(domid)}/hotplug-status")

    # --- reading state back -----------------------------------------------------

    def dump(self) -> dict[str, list[str]]:
        """Everything a vif can change in the netvm namespace, normalised for comparison."""
        sh = self.ns.sh
        links = []
        for line in self.ns.run("ip", "-o", "-d", "link", "show").stdout.splitlines():
            words = line.split()
            name = words[1].rstrip(":").split("@")[0]
            flags = words[2]
            up = "UP" in flags.strip("<>").split(",")
            group = words[words.index("group") + 1] if "group" in words else "?"
            mac = words[words.index("link/ether") + 1] if "link/ether" in words else "-"
            links.append(f"{name} up={up} group={group} mac={mac}")
        sysctls = sh(
            "grep -H . /proc/sys/net/ipv4/conf/*/proxy_arp /proc/sys/net/ipv6/conf/*/proxy_ndp "
            "/proc/sys/net/ipv6/conf/*/disable_ipv6 /proc/sys/net/ipv4/ip_forward 2>/dev/null || true"
        ).stdout
        return {
            "links": sorted(links),
            "addresses": sorted(self.ns.run("ip", "-o", "addr", "show").stdout.replace("\\", "").splitlines()),
            "routes4": sorted(self.ns.run("ip", "route", "show", "table", "all").stdout.splitlines()),
            "routes6": sorted(self.ns.run("ip", "-6", "route", "show", "table", "all").stdout.splitlines()),
            "neigh": sorted(sh("ip neigh show nud permanent; ip -6 neigh show nud permanent").stdout.splitlines()),
            "sysctls": sorted(sysctls.splitlines()),
            "rules": sorted(
                re.sub(r" \[\d+:\d+\]$", "", line)
                for line in sh("iptables-legacy-save; ip6tables-legacy-save").stdout.splitlines()
                if not line.startswith("#")
            ),
            "sets": sorted(
                line for line in self.ns.run("ipset", "list").stdout.splitlines()
                if not line.startswith(("Header:", "Size in memory:", "References:"))
            ),
            "nftables": sorted(
                re.sub(r"counter packets \d+ bytes \d+", "counter", line)
                for line in self.ns.run("nft", "list", "ruleset").stdout.splitlines()
            ),
        }

    def settled_dump(self) -> dict[str, list[str]]:
        """:meth:`dump` once two in a row agree (the kernel finishes some work after a link change)."""
        last = self.dump()
        for _ in range(40):
            time.sleep(0.05)
            now = self.dump()
            if now == last:
                return now
            last = now
        return last

    def members(self, family: int, name: str) -> list[str]:
        """Members of a logical set (``allowed``: "vif4.0 . 10.137.0.5"), sorted."""
        return sorted(self.firewall().members(family, name))


def udp_listen(ns: Netns, addr: str, port: int, count_file: Path) -> subprocess.Popen[str]:
    """Start a UDP listener in ``ns`` that appends "SOURCE PAYLOAD" per datagram to ``count_file``."""
    proc = ns.popen(list(listen_udp_argv(port, bind=addr, log=str(count_file))),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    assert ready.strip() == "ready", ready
    return proc


def udp_send(ns: Netns, src: str, dst: str, port: int, payload: str) -> None:
    ns.run(*send_udp_argv(src, dst, port, payload, count=1))


def received(
    listen_ns: Netns, listen_addr: str, log: Path, sends: list[tuple[Netns, str, str]], port: int = 5000
) -> list[str]:
    """Datagrams ``listen_addr`` got, as "SOURCE PAYLOAD" lines, from ``sends``.

    Each send is (namespace, source address, payload), in order; the listener
    waits for the last payload, which must arrive (it is the control that
    proves the path works), so whatever was dropped before it is known gone.
    """
    listener = udp_listen(listen_ns, listen_addr, port, log)
    try:
        for ns, src, payload in sends:
            udp_send(ns, src, listen_addr, port, payload)
        assert wait_for_line(log, sends[-1][2]), f"{sends[-1][2]!r} never arrived at {listen_addr}"
    finally:
        listener.kill()
        listener.wait()
    return log.read_text().splitlines()


def capture(ns: Netns, dev: str, expression: str, during: Callable[[], object]) -> str:
    """tcpdump's closing summary for packets matching ``expression`` (filter and options, such as
    ``-c1 port 53``) on ``dev`` while ``during`` runs.

    ``--immediate-mode`` hands each packet over at once, so none is lost in
    the buffer when tcpdump is stopped; "received by filter" counts in the
    kernel and so covers a packet still buffered then.
    """
    tcpdump = require_tool("tcpdump")
    proc = ns.popen([tcpdump, "-i", dev, "-n", "--immediate-mode", *expression.split()],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        while not any("listening on" in line for line in lines):
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"tcpdump did not start: {''.join(lines)}")
            lines.append(line)
        during()
        time.sleep(0.2)
        proc.send_signal(2)
        _, rest = proc.communicate(timeout=20)
        return rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mute_unix_server(path: Path) -> Iterator[list[socket.socket]]:
    """A Unix socket at ``path`` that accepts every connection and never answers (a wedged peer):
    yields the connections it holds, all closed on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_hold() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # the timeout, to look at ``stop`` again
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        yield held
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def wait_for_line(path: Path, text: str, deadline: float = 10.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def running_netvm(make_netns: NetnsFactory, conf: str, backend: str, agent: bool = False,
                  xenbus: dict[str, bool] | None = None) -> Iterator[Netvm]:
    """A netvm namespace with ``conf`` as netvm.conf, firewall ``backend``, its own embedded XenStore,
    and with ``agent`` a resident agent that every client of the test goes through.

    ``xenbus``: options of a xenbus device double (``{}``: Linux 6.x), started
    with this XenStore behind it at ``/dev/xen/xenbus`` of a mount namespace
    the netvm's commands then run in, as in a driver domain.
    """
    for tool in ("ipset", "iptables-legacy-save", "ip6tables-legacy-save", "conntrack", "nft"):
        require_tool(tool)
    # A short directory: Unix socket paths are limited to 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="vh"))
    (tmp / "hooks").mkdir()
    server = XenStoreServer(str(tmp / "xs.sock"))
    server.start_in_thread()
    env = None
    try:
        env = Netvm(make_netns, make_netns("vhnet"), tmp, str(tmp / "xs.sock"), backend, xenstored=server)
        if xenbus is not None:
            env.xenbus = XenbusDouble(str(tmp / "xs.sock"), **xenbus).start(dev=True)
            env.mount_ns = env.xenbus.mount_ns
        env.write_conf(conf)
        if agent:
            env.start_agent("--no-start-up")
        yield env
    finally:
        if env is not None:
            env.stop_agent()
        if env is not None and env.xenbus is not None:
            env.xenbus.stop()
        # NAT namespaces of mapped vifs are named globally (<vif>-nat); a
        # failed test must not leave one for the next.
        for vm in env.vms.values() if env else ():
            subprocess.run(["ip", "netns", "del", f"{vm.vif}-nat"], capture_output=True)
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
