"""The test driver inside the booted container: one scenario per boot, results to a file, then poweroff.

Run by ``ci-probe.service`` (``After=multi-user.target``, ``Type=simple``,
so the boot finishes without waiting for it) with the container's own
``/usr/bin/python3`` (standard library only: nothing of the project is
imported, the package under test is what apt installed). Every step is
recorded in ``/ci/results.json`` as it happens, so a step that fails or
hangs still leaves the steps before it, and the test outside the container
asserts on them together with the container's journal. This module never
asserts: the tests do.

Usage: ``probe.py SCENARIO`` with SCENARIO one of :data:`SCENARIOS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

RESULTS = "/ci/results.json"
XENSTORED = "/run/xenstored/socket"
HOOK_RESULTS = "/run/ci-hooks"
#: Units of the package (the DNS watcher is enabled by the test's image, not by the package).
UNITS = ("vif-hotplug-init.service", "vif-hotplug-agent.socket", "vif-hotplug-agent.service",
         "vif-hotplug-dns-watch.service")
SHOWN = ("ActiveState", "SubState", "Result", "ConditionResult", "MainPID", "InvocationID",
         "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic", "ActiveEnterTimestampMonotonic",
         "InactiveExitTimestampMonotonic", "NRestarts", "UnitFileState", "LoadState")
HARDENING = ("CapabilityBoundingSet", "NoNewPrivileges", "RestrictAddressFamilies", "RestrictNamespaces",
             "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "LockPersonality",
             "RestrictSUIDSGID", "MemoryDenyWriteExecute", "ProtectHostname", "UMask", "PrivateMounts",
             "ProtectSystem", "PrivateTmp", "Environment", "SyslogIdentifier", "Restart")

results: dict[str, Any] = {}


def save() -> None:
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, RESULTS)


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> dict[str, Any]:
    """``argv``'s exit code, output and wall time (milliseconds)."""
    full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **(env or {})}
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=full, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return {"argv": list(argv), "rc": None, "out": str(exc.stdout or ""), "err": "timeout",
                "ms": int((time.monotonic() - start) * 1000)}
    return {"argv": list(argv), "rc": proc.returncode, "out": proc.stdout, "err": proc.stderr,
            "ms": int((time.monotonic() - start) * 1000)}


def step(name: str, value: Any) -> Any:
    results[name] = value
    save()
    return value


def show(unit: str, *props: str) -> dict[str, str]:
    out = run("systemctl", "show", unit, *(f"--property={p}" for p in (props or SHOWN)))["out"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def units() -> dict[str, dict[str, str]]:
    return {u: show(u) for u in (*UNITS, "network-pre.target")}


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def proc_status(pid: str) -> dict[str, str]:
    text = read(f"/proc/{pid}/status") or ""
    return dict((k, v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()))


def agent_processes() -> list[str]:
    """Command lines of running ``vif-hotplug agent`` processes."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmdline = (read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
        if "vif_hotplug.entry vif-hotplug agent" in cmdline:
            found.append(f"{pid} {cmdline.strip()}")
    return found


def wait_for(check: Callable[[], bool], deadline: float = 20.0) -> bool:
    # Not tests/polling.py's: this file is copied alone into the container and runs there.
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


# --- the toolstack's side -------------------------------------------------------------------


def xs(*args: str, command: str = "xenstore-write") -> dict[str, Any]:
    return run(command, *args, env={"XENSTORED_PATH": XENSTORED})


def add_vm(domid: int, ip: str) -> None:
    """A veth standing in for netback's vif, and the backend keys libxl writes
    (as tests/functional/hotplug_env.py does)."""
    vif = f"vif{domid}.0"
    run("ip", "link", "add", vif, "type", "veth", "peer", "name", f"vm{domid}")
    base = f"backend/vif/{domid}/0"
    keys = {
        "frontend": f"/local/domain/{domid}/device/vif/0", "frontend-id": str(domid), "online": "1", "state": "2",
        "script": "/etc/xen/scripts/vif-route-qubes", "mac": f"00:16:3e:5e:6c:{domid:02x}", "ip": ip,
        "type": "vif", "handle": "0",
    }
    xs(*(word for key, value in keys.items() for word in (f"{base}/{key}", value)))


def hotplug(command: str, domid: int) -> dict[str, Any]:
    """``/etc/xen/scripts/vif-route-qubes COMMAND type_if=vif`` with libxl's environment."""
    env = {"XENBUS_PATH": f"backend/vif/{domid}/0", "XENBUS_TYPE": "vif", "XENBUS_BASE_PATH": "backend",
           "vif": f"vif{domid}.0", "script": "/etc/xen/scripts/vif-route-qubes", "netdev": ""}
    result = run("/etc/xen/scripts/vif-route-qubes", command, "type_if=vif", env=env)
    result["hotplug-status"] = xs(f"backend/vif/{domid}/0/hotplug-status", command="xenstore-read")["out"].strip()
    return result


def agent_serving() -> dict[str, str]:
    return show("vif-hotplug-agent.service", "ActiveState", "MainPID", "InvocationID", "NRestarts")


def base_firewall() -> dict[str, Any]:
    return {"tables": run("nft", "list", "tables")["out"].split("\n"),
            "input": run("nft", "list", "chain", "ip", "qubes", "input")["out"],
            "ip_forward": (read("/proc/sys/net/ipv4/ip_forward") or "").strip()}


# --- scenarios --------------------------------------------------------------------------------


def boot_state() -> None:
    step("boot_id", (read("/proc/sys/kernel/random/boot_id") or "").strip())
    step("system", run("systemctl", "is-system-running", "--wait", timeout=90)["out"].strip())
    step("failed", run("systemctl", "list-units", "--failed", "--plain", "--no-legend")["out"].split("\n"))
    step("units", units())


def scenario_broken() -> None:
    """netvm.conf broken: init fails, network-pre.target is not reached, forwarding stays off."""
    boot_state()
    step("status", run("systemctl", "status", "--no-pager", "--lines=20", "vif-hotplug-init.service"))
    step("firewall", base_firewall())


def scenario_main() -> None:
    """A plain Debian netvm: boot, events through the socket-activated agent, restart, upgrade, purge."""
    boot_state()
    step("firewall", base_firewall())
    step("socket_path", os.path.exists("/run/vif-hotplug/agent.sock"))
    step("listening", run("ss", "-xlpn")["out"])
    step("hardening", {u: show(u, *HARDENING) for u in UNITS})

    step("own_namespaces", {"mnt_ns": os.readlink("/proc/self/ns/mnt"), "net_ns": os.readlink("/proc/self/ns/net")})
    add_vm(5, "10.137.0.5")
    step("online5", hotplug("online", 5))
    step("agent_after_online5", agent_serving())
    agent_pid = results["agent_after_online5"]["MainPID"]
    step("agent_status", proc_status(agent_pid))
    # The hooks of vif5.0 ran in the agent (its start-up reconcile or the event, whichever
    # brought it up first); their sandbox is the agent's.
    wait_for(lambda: os.path.exists(f"{HOOK_RESULTS}/vif5.0.json"))
    step("hook5", json.loads(read(f"{HOOK_RESULTS}/vif5.0.json") or "null"))
    step("routes", run("ip", "route")["out"])

    # A mapped ("visible") address: the NAT namespace, named under /run/netns by the agent,
    # must be visible here (the agent has no mount namespace of its own).
    add_vm(6, "10.137.0.6")
    step("online6", hotplug("online", 6))
    step("netns", sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else [])

    step("dns", run("/usr/lib/qubes/qubes-setup-dnat-to-ns"))
    step("dns_watch", show("vif-hotplug-dns-watch.service"))
    step("dns_watch_status", proc_status(results["dns_watch"]["MainPID"]))

    # The legacy xtables backend: switched at the next event after netvm.conf says so.
    with open("/etc/vif-hotplug/netvm.conf", "a") as f:
        f.write("\n[firewall]\nbackend = iptables\n")
    add_vm(7, "10.137.0.7")
    step("online7_iptables", hotplug("online", 7))
    step("xtables", run("iptables-legacy-save")["out"])

    before = show("vif-hotplug-init.service")
    step("restart_init", run("systemctl", "restart", "vif-hotplug-init.service", timeout=60))
    step("after_restart", {"init": show("vif-hotplug-init.service"), "init_before": before,
                           "agent": agent_serving(), "socket": show("vif-hotplug-agent.socket")})

    # Restart=: the agent killed outright comes back by itself (no client asks).
    killed = agent_serving()
    os.kill(int(killed["MainPID"]), 9)
    wait_for(lambda: agent_serving()["MainPID"] not in ("0", killed["MainPID"]))
    step("agent_killed", {"before": killed, "after": show("vif-hotplug-agent.service")})

    # Upgrade to the newer build (bind-mounted at /debs-new); the agent is running.
    step("before_upgrade", {"agent": agent_serving(), "init": show("vif-hotplug-init.service"),
                            "forward": base_firewall()["ip_forward"]})
    step("upgrade", run("sh", "-c", "dpkg -i /debs-new/vif-hotplug_*.deb /debs-new/vif-hotplug-lab_*.deb",
                        timeout=300))
    step("after_upgrade", {"agent": agent_serving(), "init": show("vif-hotplug-init.service"),
                           "forward": base_firewall()["ip_forward"],
                           "version": run("dpkg-query", "-W", "-f=${Version}", "vif-hotplug")["out"]})
    add_vm(8, "10.137.0.8")
    step("online8_after_upgrade", hotplug("online", 8))
    step("agent_after_online8", agent_serving())

    step("remove_lab", run("apt-get", "remove", "-y", "vif-hotplug-lab",
                           env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300))
    step("lab_without_lab_package", run("vif-hotplug", "lab"))
    step("purge", run("apt-get", "purge", "-y", "vif-hotplug", env={"DEBIAN_FRONTEND": "noninteractive"},
                      timeout=300))
    step("after_purge", {
        "units": {u: show(u, "LoadState", "ActiveState") for u in UNITS},
        "unit_files": run("systemctl", "list-unit-files", "--no-legend", "vif-hotplug*")["out"],
        "paths": {p: os.path.lexists(p) for p in (
            "/etc/vif-hotplug", "/run/vif-hotplug", "/run/vif-hotplug.lock", "/etc/xen/scripts/vif-route-qubes",
            "/usr/bin/vif-hotplug", "/usr/lib/python3/dist-packages/vif_hotplug",
            "/lib/systemd/system/vif-hotplug-init.service",
            "/etc/systemd/system/network-pre.target.requires/vif-hotplug-init.service",
            "/etc/systemd/system/multi-user.target.wants/vif-hotplug-init.service",
            "/etc/systemd/system/sockets.target.wants/vif-hotplug-agent.socket",
            "/lib/systemd/system/qubes-network.service.d/50-vif-hotplug.conf")},
        "diversions": run("dpkg-divert", "--list")["out"],
        "dpkg": run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "vif-hotplug")["out"],
        "agent_processes": agent_processes(),
        "firewall": base_firewall(),
        "xtables": run("iptables-legacy-save")["out"],
    })


def scenario_qubes_appvm() -> None:
    """A Qubes VM without the network service: nothing of the package starts, Qubes' own units do."""
    boot_state()
    step("qubes", {u: show(u) for u in ("qubes-antispoof.service", "qubes-iptables.service",
                                          "qubes-firewall.service", "qubes-network.service")})
    step("firewall", base_firewall())
    step("qubes_chains", run("nft", "list", "table", "ip", "qubes")["out"])


def scenario_qubes_netvm() -> None:
    """A Qubes netvm: this package's init instead of Qubes' base firewall, before Qubes' firewall
    and network services; Qubes' files diverted; removal puts them back."""
    boot_state()
    step("qubes", {u: show(u) for u in ("qubes-antispoof.service", "qubes-iptables.service",
                                          "qubes-firewall.service", "qubes-network.service")})
    step("firewall", base_firewall())
    step("qubes_chains", run("nft", "list", "table", "ip", "qubes")["out"])
    add_vm(9, "10.137.0.9")
    step("online9", hotplug("online", 9))
    paths = ("/etc/xen/scripts/vif-route-qubes", "/usr/lib/qubes/qubes-setup-dnat-to-ns",
             "/etc/NetworkManager/dispatcher.d/qubes-nmhook")
    step("installed_files", {p: {"owner": run("dpkg", "-S", p)["out"].strip(), "text": read(p)} for p in paths})
    step("diversions", run("dpkg-divert", "--list")["out"])
    step("remove", run("apt-get", "remove", "-y", "vif-hotplug-lab", "vif-hotplug",
                       env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300))
    step("removed_files", {p: {"owner": run("dpkg", "-S", p)["out"].strip(), "text": read(p)} for p in paths})
    step("purge", run("apt-get", "purge", "-y", "vif-hotplug", env={"DEBIAN_FRONTEND": "noninteractive"},
                      timeout=300))
    step("purged_files", {p: {"owner": run("dpkg", "-S", p)["out"].strip(), "text": read(p)} for p in paths})
    step("diversions_after", run("dpkg-divert", "--list")["out"])
    step("qubes_after", {u: show(u, "ActiveState", "LoadState") for u in ("qubes-network.service",)})


SCENARIOS: dict[str, Callable[[], None]] = {
    "broken": scenario_broken,
    "main": scenario_main,
    "qubes-appvm": scenario_qubes_appvm,
    "qubes-netvm": scenario_qubes_netvm,
}


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - recorded for the test outside, which fails on it
        step("probe_error", f"{type(exc).__name__}: {exc}")
    finally:
        step("done", True)


def main() -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with recorded():
        SCENARIOS[sys.argv[1]]()
    subprocess.run(["systemctl", "--no-block", "poweroff"], check=False)


if __name__ == "__main__":
    main()
