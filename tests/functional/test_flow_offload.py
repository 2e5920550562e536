"""Flow offload (current Qubes' ``inet qubes-nat-accel``) against the kernel, on both backends.

What holds on any kernel: the probe changes nothing, ``init`` installs the
flowtable exactly where the probe finds the kernel can have one, and vif
events work either way. This project's kernel has no flowtables
(``CONFIG_NF_FLOW_TABLE`` unset): here the tests prove the "absent" side;
on a kernel with them, the same tests check the installed table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from vif_hotplug.kernel.iptables_backend import IptablesBackend
from vif_hotplug.kernel.netns import thread_netns
from vif_hotplug.kernel.nfnl import Nfnl
from vif_hotplug.kernel.nftables_backend import NftablesBackend

from .conftest import NetnsFactory
from .hotplug_env import GATEWAY, Netvm, running_netvm

pytestmark = pytest.mark.netns

CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
ACCEL = "qubes-nat-accel"


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, CONF, backend) as env:
        yield env


def probe(netvm: Netvm) -> str | None:
    lock = str(netvm.tmp / "probe.lock")
    fw = NftablesBackend(lock, 5.0, netns=netvm.ns.name) if netvm.fw_backend == "nftables" else \
        IptablesBackend(lock, 5.0)
    try:
        return fw.flow_offload_missing()
    finally:
        fw.close()


def accel_table(netvm: Netvm) -> list[dict[str, object]] | None:
    proc = netvm.ns.run("nft", "-j", "list", "table", "inet", ACCEL, check=False)
    return json.loads(proc.stdout)["nftables"] if proc.returncode == 0 else None


def generation(netvm: Netvm) -> int:
    """The namespace's nftables generation: every committed transaction moves it, even one that
    adds and deletes the same table (which a listing would not show)."""
    nfnl = Nfnl()
    try:
        with thread_netns(netvm.ns.name):
            nfnl.open()
        return nfnl.nft_genid()
    finally:
        nfnl.close()


def test_the_flowtable_probe_changes_nothing(netvm: Netvm) -> None:
    netvm.tool("init")
    before = (netvm.ns.run("nft", "-j", "list", "ruleset").stdout, generation(netvm))
    probe(netvm)
    assert (netvm.ns.run("nft", "-j", "list", "ruleset").stdout, generation(netvm)) == before


def test_init_installs_flow_offload_exactly_where_the_probe_finds_flowtables(netvm: Netvm) -> None:
    missing = probe(netvm)
    netvm.tool("init")
    assert (accel_table(netvm) is not None) == (missing is None)


def test_init_says_why_it_offloads_nothing_or_what_it_offloads(netvm: Netvm) -> None:
    out = netvm.tool("init", "--dry-run").stdout
    expected = "no flow offload" if probe(netvm) is not None else f"flowtable inet {ACCEL} qubes-accel"
    assert expected in out


def test_vif_events_work_and_follow_the_flowtable_only_where_init_installed_it(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    listed = accel_table(netvm)
    joined = listed is not None and any("vif4.0" in json.dumps(i["flowtable"]) for i in listed if "flowtable" in i)
    netvm.hotplug("offline", 4)
    assert (netvm.status(4), joined) == ("connected", listed is not None)


def test_a_recorded_flowtable_that_is_gone_does_not_fail_an_online(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    state = netvm.tmp / "state"
    # What init records where it installed the flowtable, with the table itself gone.
    names = [n for n in os.listdir(state) if n.startswith("backend-")]
    (state / names[0].replace("backend-", "offload-", 1)).write_text("{}")
    netvm.ns.run("nft", "delete", "table", "inet", ACCEL, check=False)
    netvm.hotplug("online", 4)
    assert netvm.status(4) == "connected"
