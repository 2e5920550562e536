"""What ``-v`` and ``--dry-run`` print (app.runtime.plan_text)."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_network
from types import SimpleNamespace

from vif_hotplug.app.runtime import plan_text
from vif_hotplug.core.model import LinkFacts, NetvmParams, Plan, VmNetwork
from vif_hotplug.core.plan_vif import OnlineInputs, plan_online
from vif_hotplug.kernel.nftables_backend import NftablesBackend

PLAN = plan_online(OnlineInputs(
    "vif4.0", 4, VmNetwork((ip_network("10.137.0.5/32"),), "00:16:3e:5e:6c:00"),
    NetvmParams(gateway=IPv4Address("10.137.0.1")), LinkFacts(exists=True, ipv6_disabled=True), "/hooks",
))


def test_without_a_host_every_step_prints_as_logs_show_it_and_a_ruleset_as_its_intent() -> None:
    lines = plan_text(PLAN)
    assert lines[0] == "sysctl net.ipv4.conf.vif4.0.proxy_arp=1"
    assert "link vif4.0 group 2" in lines and "add route 10.137.0.5/32 dev vif4.0 metric 32748" in lines
    assert "firewall antispoof:" in lines and "  set ip qubes allowed" in lines  # backend-neutral intent
    assert lines.index("link vif4.0 group 2") < lines.index("link vif4.0 up")


def test_with_a_host_a_ruleset_prints_in_the_backends_own_syntax() -> None:
    host = SimpleNamespace(firewall=NftablesBackend("/nonexistent/lock", 1.0))
    lines = plan_text(PLAN, host)  # type: ignore[arg-type]
    assert "firewall antispoof, nftables:" in lines
    assert "  add set ip qubes allowed (and allowed-nets for networks)" in lines


def test_the_hooks_and_notes_come_last() -> None:
    plan = Plan("online", "vif4.0", PLAN.steps, ("IPv6 disabled on vif4.0",), PLAN.hooks)
    assert plan_text(plan)[-2:] == ["hooks in /hooks: online vif4.0 vif 10.137.0.5", "note: IPv6 disabled on vif4.0"]
