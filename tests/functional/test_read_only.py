"""Read-only commands stay read-only, and a pending backend change is moved once (issue 17, item 1).

A netvm whose state is in one firewall backend while netvm.conf now asks
for the other: every read-only command leaves the kernel (both backends'
objects, links, routes, sysctls) and the state directory byte for byte as
they were, and two changing events that find the change move the state once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import NetnsFactory
from .hotplug_env import GATEWAY, Netvm, running_netvm
from .kernel_state import other_backend_is_empty

pytestmark = pytest.mark.netns

CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
OTHER = {"nftables": "iptables", "iptables": "nftables"}


@pytest.fixture
def pending(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    """init and one VM online in ``backend``; then netvm.conf asks for the other backend."""
    with running_netvm(make_netns, CONF, backend) as netvm:
        resolv = netvm.tmp / "resolv.conf"
        resolv.write_text("nameserver 192.0.2.53\n")
        netvm.tool("init", "--resolv-conf", str(resolv))
        netvm.add_vm(4)
        netvm.add_vm(5)
        netvm.hotplug("online", 4)
        netvm.write_conf(CONF + f"[firewall]\nbackend = {OTHER[backend]}\n")
        yield netvm


def _state(netvm: Netvm) -> dict[str, str]:
    """Every file of the netvm's state directory (and its lock), with a digest of its bytes."""
    out = {}
    for root in (Path(netvm.env["VIF_HOTPLUG_STATE_DIR"]), netvm.tmp):
        for path in sorted(root.iterdir()) if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("command", [
    ("route", "--dry-run", "online"),
    ("route", "-v", "--dry-run", "online"),
    ("route", "--dry-run", "offline"),
    ("status",),
    ("status", "--json", "-v"),
    ("reconcile", "--dry-run"),
    ("init", "--dry-run"),
    ("dns", "--dry-run"),
    ("connected-ips",),
], ids=lambda c: " ".join(c))
def test_a_read_only_command_with_a_backend_change_pending_changes_nothing_at_all(
    pending: Netvm, command: tuple[str, ...],
) -> None:
    netvm = pending
    before = (netvm.settled_dump(), _state(netvm))
    env = {"XENBUS_PATH": "backend/vif/4/0", "vif": "vif4.0"} if command[0] == "route" else {}
    args = [*command, "type_if=vif"] if command[0] == "route" else list(command)
    if command[0] == "dns":
        args += ["--resolv-conf", str(netvm.tmp / "resolv.conf")]
    proc = netvm.tool(*args, env=env, check=False)
    assert proc.returncode in (0, 1), proc.stderr  # status exits 1 where the other backend is wanted
    dump, state = netvm.settled_dump(), _state(netvm)
    assert {k: v for k, v in state.items() if before[1].get(k) != v} == {}
    assert sorted(set(before[1]) - set(state)) == []
    assert dump == before[0]


def test_status_says_a_backend_change_is_pending(pending: Netvm) -> None:
    proc = pending.tool("status", "--json", check=False)
    assert "until a changing command moves it" in proc.stderr
    assert json.loads(proc.stdout)["backend"] == pending.fw_backend


def test_two_concurrent_events_after_a_configuration_change_switch_once(pending: Netvm, backend: str) -> None:
    netvm = pending
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda domid: netvm.hotplug("online", domid, check=False), (4, 5)))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    switches = sum(r.stderr.count("firewall backend changed from") for r in results)
    assert switches == 1, [r.stderr for r in results]
    netvm.fw_backend = OTHER[backend]
    assert other_backend_is_empty(lambda *cmd: netvm.ns.run(*cmd), OTHER[backend])
    assert netvm.members(4, "allowed") == ["vif4.0 . 10.137.0.4", "vif5.0 . 10.137.0.5"]
