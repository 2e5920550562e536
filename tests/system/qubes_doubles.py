"""Test doubles of Qubes' VM packages, for a Qubes template the test cannot have.

Qubes' packages (qubes-core-agent, qubes-core-agent-networking,
qubes-core-agent-network-manager) come from Qubes' own repository, which is
not reachable here, and their units need QubesDB and Xen. The doubles own
the same files at the same paths (so dpkg's diversions are exercised for
real) and have units with Qubes' names and dependencies, each copied from
the source named beside it. Their commands do not build Qubes' rulesets;
they enforce the rules the ordering must keep, and fail loudly (the unit
fails, the boot is degraded, the test sees it) where this package breaks
one:

* exactly one unit loads ``table ip qubes``: Qubes' ``nft -f`` of a table
  that exists appends to it (nft(8): a table declaration adds to an existing
  table), so Qubes' unit refuses a table someone else loaded, and leaves a
  marker chain in the one it loads;
* Qubes' firewall service fills its own tables only once the base firewall
  is in place (qubes-firewall.service: ``After=qubes-iptables.service``);
* Qubes' network service switches forwarding on only after the base
  firewall (qubes-network.service: ``After=network-pre.target
  qubes-iptables.service``), as network-proxy-setup.sh does, after running
  /usr/lib/qubes/qubes-setup-dnat-to-ns (whatever that path holds: this
  package's copy once it diverted Qubes').

Sources: shared/README.md section 11; QubesOS/qubes-core-agent-linux
``vm-systemd/qubes-antispoof.service``, ``qubes-iptables.service``,
``qubes-firewall.service``, ``qubes-network.service``,
``qubes-sysinit.service``, ``network-proxy-setup.sh``.
"""

from __future__ import annotations

from .container import DoublePackage

#: What QubesDB's /qubes-service/ lists in the double's VM, one name a line (the test writes it).
SERVICES_FILE = "/etc/ci-qubes/services"
#: The text of each diverted file of Qubes' in the doubles: found again after removal.
QUBES_TEXT = "# test double of Qubes' {path} ({package})\n"

LOAD = "/usr/lib/ci-qubes/load-base"

_LOAD_BASE = """\
#!/bin/sh
# Double of Qubes' base firewall loaders (qubes-antispoof.service runs
# nft -f /etc/qubes/qubes-antispoof.nft, qubes-iptables.service the same for
# qubes-ipv4.nft / qubes-ipv6.nft). nft -f of an existing table appends to it:
# two loaders would double every rule, so this refuses a table it did not make.
set -e
part=$1
if [ "$part" = antispoof ]; then
    if nft list table ip qubes >/dev/null 2>&1; then
        echo "qubes-antispoof: table ip qubes is already loaded by another unit" >&2
        exit 1
    fi
    nft -f - <<EOF
table ip qubes {
    chain qubes-antispoof-loaded {}
}
EOF
else
    if ! nft list chain ip qubes qubes-antispoof-loaded >/dev/null 2>&1; then
        echo "qubes-iptables: table ip qubes was not loaded by qubes-antispoof" >&2
        exit 1
    fi
    nft -f - <<EOF
table ip qubes {
    chain qubes-iptables-loaded {}
    chain input { type filter hook input priority filter; policy drop; }
}
EOF
fi
"""

_REQUIRE_BASE = """\
#!/bin/sh
# The base firewall must be in place before Qubes' firewall and network
# services act (their units are ordered after qubes-iptables.service).
if ! nft list chain ip qubes input 2>/dev/null | grep -q 'policy drop'; then
    echo "$1: the base firewall (ip qubes input, policy drop) is not in place" >&2
    exit 1
fi
"""

_FIREWALL = """\
#!/bin/sh
# Double of qubes-firewall (qubesagent/firewall.py): its own tables, after the base firewall.
set -e
/usr/lib/ci-qubes/require-base qubes-firewall
nft add table ip qubes-firewall
"""

_NETWORK_SETUP = """\
#!/bin/sh
# Double of network-proxy-setup.sh (qubes-network.service): the DNS script, then forwarding on.
set -e
/usr/lib/ci-qubes/require-base qubes-network
status=0
/usr/lib/qubes/qubes-setup-dnat-to-ns || status=$?
[ "$status" = 0 ] || [ "$status" = 100 ]
echo 1 > /proc/sys/net/ipv4/ip_forward
"""

_SYSINIT = """\
#!/bin/sh
# Double of qubes-sysinit.sh: /run/qubes-service/NAME for each service QubesDB enables.
set -e
mkdir -p /run/qubes-service
while read -r name; do
    [ -n "$name" ] && touch "/run/qubes-service/$name"
done < /etc/ci-qubes/services
"""

# vm-systemd/qubes-sysinit.service
SYSINIT_UNIT = """\
[Unit]
Description=Init Qubes Services settings (test double)
DefaultDependencies=no
Before=sysinit.target
After=systemd-modules-load.service qubes-db.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/ci-qubes/sysinit

[Install]
WantedBy=sysinit.target
"""

# vm-systemd/qubes-antispoof.service; shared/README.md section 11
ANTISPOOF_UNIT = f"""\
[Unit]
Description=Qubes anti-spoofing firewall rules (test double)
Before=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={LOAD} antispoof

[Install]
RequiredBy=network-pre.target
"""

# vm-systemd/qubes-iptables.service; shared/README.md section 11 (current Qubes:
# Before=/RequiredBy=network-pre.target)
IPTABLES_UNIT = f"""\
[Unit]
Description=Qubes base firewall settings (test double)
Requires=qubes-antispoof.service
After=qubes-antispoof.service
Before=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={LOAD} base

[Install]
RequiredBy=network-pre.target
"""

# vm-systemd/qubes-firewall.service. Current Qubes has Type=notify-reload, which Debian 12's
# systemd 252 does not know; a oneshot orders the same way (units after it wait for it).
FIREWALL_UNIT = """\
[Unit]
Description=Qubes firewall updater (test double)
ConditionPathExists=/var/run/qubes-service/qubes-firewall
After=qubes-iptables.service
Before=qubes-network.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/ci-qubes/firewall

[Install]
WantedBy=multi-user.target
"""

# vm-systemd/qubes-network.service
NETWORK_UNIT = """\
[Unit]
Description=Qubes network forwarding setup (test double)
ConditionPathExists=/var/run/qubes-service/qubes-network
Before=network.target
After=network-pre.target qubes-iptables.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/ci-qubes/network-proxy-setup

[Install]
WantedBy=multi-user.target
"""

#: The files of Qubes' that vif-hotplug diverts, by package.
DIVERTED = {
    "/etc/xen/scripts/vif-route-qubes": "qubes-core-agent-networking",
    "/usr/lib/qubes/qubes-setup-dnat-to-ns": "qubes-core-agent-networking",
    "/etc/NetworkManager/dispatcher.d/qubes-nmhook": "qubes-core-agent-network-manager",
}


def _script(path: str, package: str) -> tuple[str, int]:
    return "#!/bin/sh\n" + QUBES_TEXT.format(path=path, package=package) + "exit 1\n", 0o755


def _enable(*units: str) -> str:
    lines = "".join(f"    deb-systemd-helper enable {u}\n" for u in units)
    return f'#!/bin/sh\nset -e\nif [ "$1" = configure ]; then\n{lines}fi\n'


def packages() -> list[DoublePackage]:
    core = DoublePackage(
        "qubes-core-agent",
        {"/usr/share/qubes/marker-vm": ("4.2\n", 0o644),
         "/usr/lib/ci-qubes/sysinit": (_SYSINIT, 0o755),
         "/lib/systemd/system/qubes-sysinit.service": (SYSINIT_UNIT, 0o644)},
        postinst=_enable("qubes-sysinit.service"),
        description="test double of Qubes' VM core agent (marker-vm, qubes-sysinit)",
    )
    networking_files = {path: _script(path, pkg) for path, pkg in DIVERTED.items()
                        if pkg == "qubes-core-agent-networking"}
    networking_files.update({
        LOAD: (_LOAD_BASE, 0o755),
        "/usr/lib/ci-qubes/require-base": (_REQUIRE_BASE, 0o755),
        "/usr/lib/ci-qubes/firewall": (_FIREWALL, 0o755),
        "/usr/lib/ci-qubes/network-proxy-setup": (_NETWORK_SETUP, 0o755),
        "/lib/systemd/system/qubes-antispoof.service": (ANTISPOOF_UNIT, 0o644),
        "/lib/systemd/system/qubes-iptables.service": (IPTABLES_UNIT, 0o644),
        "/lib/systemd/system/qubes-firewall.service": (FIREWALL_UNIT, 0o644),
        "/lib/systemd/system/qubes-network.service": (NETWORK_UNIT, 0o644),
    })
    networking = DoublePackage(
        "qubes-core-agent-networking", networking_files,
        conffiles=["/etc/xen/scripts/vif-route-qubes"], depends="qubes-core-agent, nftables",
        postinst=_enable("qubes-antispoof.service", "qubes-iptables.service", "qubes-firewall.service",
                         "qubes-network.service"),
        description="test double of Qubes' networking agent",
    )
    nm_path = "/etc/NetworkManager/dispatcher.d/qubes-nmhook"
    # More than the diverted file, as the real package has: dpkg makes a package whose every
    # file another package now ships "disappear".
    prepare = "/usr/lib/qubes/network-manager-prepare-conf-dir"
    network_manager = DoublePackage(
        "qubes-core-agent-network-manager",
        {nm_path: _script(nm_path, DIVERTED[nm_path]), prepare: _script(prepare, DIVERTED[nm_path])},
        conffiles=[nm_path], depends="qubes-core-agent-networking",
        description="test double of Qubes' NetworkManager integration",
    )
    return [core, networking, network_manager]
