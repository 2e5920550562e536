"""Hostile input to the real entry points: one line on stderr and no state change, never a traceback.

Each property runs an installed command in the netvm's namespace with
generated input (XenStore values of the vif's backend, the toolstack's
environment, argv, netvm.conf, resolv.conf) and checks the documented
contract: exit 0 (the input was valid: whatever it did is allowed), or
exit 1 with exactly one line on stderr and the namespace exactly as before
(``Netvm.dump``), or, for a usage error, exit 2 with argparse's usage lines
ending in its one ``error:`` line. Never a Python traceback.

Every example spawns a process (~0.5 s), so each property is limited to a
few derandomized examples on a netvm shared by the properties of one
backend; the state is compared around every example, so whatever a valid
example changed is the next one's starting point.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vif_hotplug.xen.xenstore_client import XenStore
from vif_hotplug.xen.xs_wire import Op

from .conftest import BACKENDS, NetnsFactory, entry_point, require_root
from .hotplug_env import GATEWAY, NETBACK_MAC, Netvm, running_netvm

pytestmark = pytest.mark.netns

CONF = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"
DOMID = 4
FEW = settings(max_examples=20, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", params=BACKENDS)
def netvm(request: pytest.FixtureRequest) -> Iterator[Netvm]:
    """A netvm with VM 4's link and backend keys (not online), after ``init``."""
    require_root()
    factory = NetnsFactory()
    try:
        with running_netvm(factory, CONF, str(request.param)) as env:
            for key in ("all", "default"):  # no DAD: a link's IPv6 state is complete when it is up
                env.ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
            (env.tmp / "resolv.conf").write_text("nameserver 192.0.2.53\n")
            env.add_vm(DOMID)
            env.tool("init", "--resolv-conf", str(env.tmp / "resolv.conf"))
            yield env
    finally:
        factory.cleanup()


# --- the contract ----------------------------------------------------------------------------


def vif_device(netvm: Netvm) -> str:
    """The name VM 4's vif has now: the only link with netback's MAC here, whatever it was renamed to."""
    for line in netvm.ns.run("ip", "-o", "link", "show").stdout.splitlines():
        if f"link/ether {NETBACK_MAC}" in line:
            return line.split(":")[1].strip().split("@")[0]
    raise AssertionError("VM 4's vif is gone")


def restore_vif(netvm: Netvm, offline: bool = True) -> None:
    """VM 4's backend keys as they were and, after an example that did something, the vif offline
    under its own name again (a valid vifname renames it)."""
    base = netvm.backend(DOMID)
    for key, value in (("ip", "10.137.0.4"), ("mac", "00:16:3e:5e:6c:04"), ("type", "vif")):
        netvm.xs_write(f"{base}/{key}", value)
    if offline:
        netvm.hotplug("offline", DOMID, check=False)
    netvm.xs_rm(f"{base}/vifname")
    name = vif_device(netvm)
    if name != "vif4.0":
        netvm.ns.run("ip", "link", "set", name, "down")
        netvm.ns.run("ip", "link", "set", name, "name", "vif4.0")
    if offline:
        netvm.settled_dump()


def assert_refused_or_done(
    netvm: Netvm, proc: subprocess.CompletedProcess[str], before: dict[str, list[str]], *, ok: tuple[int, ...] = (0,),
    usage: int | None = 2,
) -> None:
    """Exit ``ok`` (anything may have changed), or 1 with one line and no change, or a usage error."""
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode in ok:
        return
    after = netvm.dump()
    if after != before:  # look again once the kernel is done with whatever it was doing
        after = netvm.settled_dump()
    if usage is not None and proc.returncode == usage:
        lines = proc.stderr.split("\n")
        assert proc.stderr.endswith("\n") and ": error: " in lines[-2], proc.stderr
        assert after == before
        return
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr}"
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, f"not one line: {proc.stderr!r}"
    assert after == before, f"state changed although refused: {proc.stderr!r}"


def xs_write_raw(netvm: Netvm, path: str, value: bytes) -> None:
    """Write bytes as they are (pyxs refuses some; the wire protocol does not)."""
    with XenStore(("unix", netvm.xs_path)) as xs:
        xs.request(Op.WRITE, path.encode(), raw_tail=value)


def env_text(data: bytes) -> str:
    """Bytes as the kernel hands an environment value to Python (no NUL can be in one)."""
    return os.fsdecode(data.replace(b"\0", b""))


# --- strategies -----------------------------------------------------------------------------------

_NEAR = b"0123456789abcdef.:/ vif-_\n\t\r\\$;'\"`\xff\xc3\xa9\x00"
near_bytes = st.binary(max_size=40) | st.lists(st.sampled_from([bytes([c]) for c in _NEAR]), max_size=30).map(b"".join)
plausible = {
    "ip": st.sampled_from([b"10.137.0.4", b"10.137.0.4 fd09:24ef:4179::4", b"10.137.0.0/24", b"10.0.0.0/8",
                           b"10.137.0.1", b"10.139.1.1", b"169.254.0.1", b"0.0.0.0", b"10.137.0.4\n10.137.0.5",
                           b"10.137.0.4 -j ACCEPT"]),
    "mac": st.sampled_from([b"00:16:3e:5e:6c:04", b"01:00:5e:00:00:01", b"ff:ff:ff:ff:ff:ff", b"00:16:3e:5e:6c",
                            b"00:16:3e:5e:6c:04\n"]),
    "vifname": st.sampled_from([b"work-vm", b"uplink0", b"lo", b"vif5.0", b"a" * 15, b"a" * 16, b"x/y", b"-x"]),
    "type": st.sampled_from([b"vif", b"ioemu", b"vif$(id)", b"VIF", b"a" * 17]),
}
xs_case = st.sampled_from(sorted(plausible)).flatmap(
    lambda key: st.tuples(st.just(key), plausible[key] | near_bytes))

xenbus_words = st.sampled_from(["backend/vif/4/0", "/local/domain/0/backend/vif/4/0", "backend/vif/32753/0",
                                "backend/vif/04/0", "backend/vif/4/0/", "backend/vbd/4/0", "../backend/vif/4/0"])
vif_words = st.sampled_from(["vif4.0", "vif5.0", "uplink0", "lo", "vif4.0\nvif-route-qubes: vif4.0: forged",
                             "vif04.0", "x" * 20, "vif4.0;id", "é"])
env_value = xenbus_words | vif_words | near_bytes.map(env_text)

argv_word = st.sampled_from(["online", "offline", "add", "remove", "type_if=vif", "type_if=tap", "vif4.0", "vif99.0",
                             "-v", "--dry-run", "--help", "-x", "--", "=", "a=b=c", "online\n", "x" * 70]) | \
    near_bytes.map(env_text)

_INI_PIECES = ["[netvm]", "[hotplug]", "[firewall]", "[mapped-ip]", "[DEFAULT]", "gateway = 10.137.0.1",
               "gateway = 10.137.0.300", "gateway6 = fd09::1", "gateway6 = 10.0.0.1", "primary_dns = 10.139.1.1",
               "secondary_dns = ", "ipv6 = 2", "ipv6 = 1", "connected_ips = 10.137.0.77 nonsense",
               "hooks_dir = relative", "harden = maybe", "backend = pf", "10.137.0.50 = 10.138.0.2 10.138.0.1 x",
               "bogus = 1", "gateway", "  continued", "%(x)s", "\x00", "\udcff"]
conf_text = st.lists(st.sampled_from(_INI_PIECES) | st.text(max_size=30), max_size=8).map("\n".join)

_RESOLV_PIECES = ["nameserver 192.0.2.53", "nameserver 10.139.1.1", "nameserver 127.0.0.53", "nameserver ::1",
                  "nameserver 300.1.1.1", "nameserver", "search example", "options ndots:1", "# comment",
                  "\x7fELF\x02\x01", "garbage", "nameserver 192.0.2.54 extra words"]
resolv_bytes = st.lists(st.sampled_from([p.encode() for p in _RESOLV_PIECES]) | st.binary(max_size=30),
                        max_size=6).map(b"\n".join)


# --- vif-route-qubes -------------------------------------------------------------------------------


@FEW
@given(case=xs_case)
@example(case=("ip", b"10.137.0.4\n10.137.0.5"))
@example(case=("mac", b"\xff\xfe"))
@example(case=("vifname", b"vif5.0"))
def test_online_with_any_xenstore_value_succeeds_or_refuses_in_one_line_without_change(
    netvm: Netvm, case: tuple[str, bytes],
) -> None:
    key, value = case
    base = netvm.backend(DOMID)
    xs_write_raw(netvm, f"{base}/{key}", value)
    before = netvm.dump()
    proc = netvm.hotplug("online", DOMID, check=False)
    try:
        assert_refused_or_done(netvm, proc, before, usage=None)
        assert netvm.status(DOMID) == ("connected" if proc.returncode == 0 else "error")
        if proc.returncode == 0:
            # README: a vif renamed to its vifname keeps "vif4.0" as its alias, so it is found again.
            dev = vif_device(netvm)
            alias = netvm.ns.run("cat", f"/sys/class/net/{dev}/ifalias").stdout.strip()
            assert dev == "vif4.0" or alias == "vif4.0", f"vif4.0 renamed to {dev!r} with alias {alias!r}"
    finally:
        restore_vif(netvm, offline=proc.returncode == 0)


@settings(FEW, max_examples=10)
@given(case=xs_case)
@example(case=("vifname", b"lo"))
@example(case=("ip", b"10.137.0.99 bogus"))
def test_offline_with_any_xenstore_value_removes_the_vifs_anti_spoofing_elements_and_nothing_elses(
    netvm: Netvm, case: tuple[str, bytes],
) -> None:
    """Offline never refuses for a bad backend value: it removes what the kernel holds for the vif,
    and never acts on a device that is not this vif's (a ``vifname`` naming ``lo`` leaves it up)."""
    key, value = case
    base = netvm.backend(DOMID)
    netvm.hotplug("online", DOMID)
    xs_write_raw(netvm, f"{base}/{key}", value)
    others = {d: s for d, s in _links(netvm).items() if d != "vif4.0"}
    try:
        proc = netvm.hotplug("offline", DOMID, check=False)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 0, proc.stderr
        assert "vif4.0 . 10.137.0.4" not in netvm.members(4, "allowed")
        assert {d: s for d, s in _links(netvm).items() if d != "vif4.0"} == others
    finally:
        restore_vif(netvm)


def _links(netvm: Netvm) -> dict[str, str]:
    """Every link of the netvm with its flags and group (what an offline could wrongly change)."""
    out = {}
    for line in netvm.ns.run("ip", "-o", "link", "show").stdout.splitlines():
        fields = line.split()
        group = fields[fields.index("group") + 1] if "group" in fields else "?"
        out[fields[1].rstrip(":").split("@")[0]] = f"{fields[2]} group {group}"
    return out


@FEW
@given(command=st.sampled_from(["online", "offline"]), xenbus_path=env_value, vif=env_value)
@example(command="online", xenbus_path="backend/vif/4/0", vif="vif4.0\nvif-route-qubes: vif4.0: forged")
@example(command="online", xenbus_path="backend/vif/4/0", vif=env_text(b"vif4.0\x80"))
def test_any_toolstack_environment_succeeds_or_refuses_in_one_line_without_change(
    netvm: Netvm, command: str, xenbus_path: str, vif: str,
) -> None:
    before = netvm.dump()
    proc = netvm.hotplug(command, None, "type_if=vif", env={"XENBUS_PATH": xenbus_path, "vif": vif}, check=False)
    try:
        assert_refused_or_done(netvm, proc, before, usage=None)
    finally:
        restore_vif(netvm, offline=proc.returncode == 0)


@FEW
@given(argv=st.lists(argv_word, max_size=4))
def test_any_argv_succeeds_or_refuses_in_one_line_or_is_a_usage_error(netvm: Netvm, argv: list[str]) -> None:
    before = netvm.dump()
    run_env = dict(os.environ)
    run_env.update(netvm.env)
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{netvm.ns.name}", entry_point("vif-route-qubes"), *argv],
                          capture_output=True, text=True, env=run_env, timeout=120)
    try:
        assert_refused_or_done(netvm, proc, before)
    finally:
        restore_vif(netvm, offline=proc.returncode == 0 and bool({"online", "offline"} & set(argv)))


# --- vif-hotplug init and the DNS tool -----------------------------------------------------------------


@FEW
@given(text=conf_text)
@example(text="gateway = 10.137.0.1")
@example(text="[netvm]\ngateway = 10.137.0.300")
def test_init_with_any_netvm_conf_succeeds_or_refuses_in_one_line_without_change(netvm: Netvm, text: str) -> None:
    conf = netvm.tmp / "netvm.conf"
    try:
        conf.write_bytes(text.encode("utf-8", "surrogateescape"))
        before = netvm.dump()
        proc = netvm.tool("init", "--resolv-conf", str(netvm.tmp / "resolv.conf"), check=False)
        assert_refused_or_done(netvm, proc, before)
    finally:
        netvm.write_conf(CONF)


@FEW
@given(data=resolv_bytes)
def test_the_dns_tool_with_any_resolv_conf_succeeds_or_refuses_in_one_line_without_change(
    netvm: Netvm, data: bytes,
) -> None:
    path = netvm.tmp / "hostile-resolv.conf"
    path.write_bytes(data)
    before = netvm.dump()
    run_env = dict(os.environ)
    run_env.update(netvm.env)
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{netvm.ns.name}", entry_point("qubes-setup-dnat-to-ns"),
                           "--resolv-conf", str(path)], capture_output=True, text=True, env=run_env, timeout=120)
    assert_refused_or_done(netvm, proc, before, ok=(0, 100), usage=None)
