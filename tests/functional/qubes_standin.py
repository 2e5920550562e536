"""Stand-ins for Qubes' QubesDB and firewall service, which cannot run here (no Qubes, no qubesdb-daemon).

* :class:`QubesDb`: QubesDB as a JSON file of ``path -> value``, read by a
  ``qubesdb-read`` this module writes into a root-owned tools directory (the
  package finds it through ``VIF_HOTPLUG_TOOLS_DIR``, so it knows it runs in a
  Qubes VM). Like Qubes' ``qubesdb-read`` (``client/qubesdb-cmd.c``): one
  value per line for each path present (``path = value`` with ``-f``),
  nothing for an absent one, and then exit status 2 (since qubesdb 4.1.13).
* :class:`FirewallService`: Qubes' ``qubes-firewall`` as ``qubesagent/firewall.py``
  (qubes-core-agent-linux, its ``NftablesWorker``) builds its ruleset, with
  ``nft``: the same tables, chains, priorities, set and rule text, from the
  same QubesDB keys. Each method cites the lines of firewall.py it mirrors.
  Run as a script (``python -m tests.functional.qubes_standin reload ...``)
  it is what the recording ``systemctl`` runs for ``try-reload-or-restart
  qubes-firewall.service``: the reload a real systemd would deliver as
  SIGHUP to the ``Type=notify-reload`` service (vm-systemd/qubes-firewall.service),
  whose handler re-reads every target (firewall.py lines 364-371).
* :func:`install_tools`: that ``qubesdb-read`` and a ``systemctl`` that
  records every call and performs the firewall service's reload.

The stand-in fails loudly where the product breaks a rule of the real
service: :meth:`FirewallService.check` raises when a VM interface (this
package's interface group 2) is not named ``vif*``, the only name the
service filters (firewall.py line 662), and when the service's tables are
not as it last left them (someone else edited or removed them).

Left out, as they change nothing this package could affect: the DNS
information written back to QubesDB (lines 157-182), the handled counters
(184-195), the user scripts (94-113), the desktop notification (283-307),
and the purge of conntrack entries the new rules would block (200-235,
237-277, 638-642).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

TABLE = "qubes-firewall"
SUPPORTED = ("action", "proto", "dst4", "dst6", "dsthost", "dstports", "specialtarget", "icmptype")


class RuleParseError(Exception):
    pass


class QubesDb:
    """QubesDB's content, kept in ``path`` (JSON) so that separate processes see one database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            self.save({})

    def load(self) -> dict[str, str]:
        return dict(json.loads(self.path.read_text()))

    def save(self, data: dict[str, str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self.path)

    def write(self, key: str, value: str) -> None:
        data = self.load()
        data[key] = value
        self.save(data)

    def rm(self, prefix: str) -> None:
        self.save({k: v for k, v in self.load().items() if not k.startswith(prefix)})

    def read(self, key: str) -> str | None:
        return self.load().get(key)

    def multiread(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self.load().items() if k.startswith(prefix)}

    def set_rules(self, vm_ip: str, policy: str, *rules: str) -> None:
        """``/qubes-firewall/<ip>/policy`` and ``/NNNN`` rules, then the empty write of
        ``/qubes-firewall/<ip>`` that tells the service they are complete (firewall.py 398-402)."""
        self.rm(f"/qubes-firewall/{vm_ip}/")
        self.write(f"/qubes-firewall/{vm_ip}/policy", policy)
        for n, text in enumerate(rules):
            self.write(f"/qubes-firewall/{vm_ip}/{n:04d}", text)
        self.write(f"/qubes-firewall/{vm_ip}", "")


def _nft(text: str) -> None:
    """Mirrors ``run_nft`` (firewall.py 429-437): ``nft -f /dev/stdin``, failure raised."""
    proc = subprocess.run(["nft", "-f", "/dev/stdin"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stdout}{proc.stderr}\n{text}")


def _chain_exists(family: str, chain: str) -> bool:
    return subprocess.run(["nft", "list", "chain", family, TABLE, chain], capture_output=True).returncode == 0


class FirewallService:
    """Qubes' firewall service for one netvm namespace (run its methods inside that namespace)."""

    def __init__(self, db: QubesDb, resolv_conf: Path) -> None:
        self.db = db
        #: firewall.py reads /etc/resolv.conf (lines 333-342); tests point it at the file the DNS tool reads.
        self.resolv_conf = resolv_conf

    # --- lines 650-680: init -------------------------------------------------------------------------

    def init(self) -> None:
        """The two tables, then every target and the connected addresses (main, lines 350-362)."""
        text = ""
        for num in (4, 6):
            family = "ip6" if num == 6 else "ip"
            text += (
                f"table {family} {TABLE} {{\n"
                f"  set dns-addr {{\n    type ipv{num}_addr\n  }}\n"
                "  chain qubes-forward {\n  }\n"
                "  chain forward {\n"
                "    type filter hook forward priority 0;\n"
                "    policy drop;\n"
                "    ct state established,related accept\n"
                '    meta iifname != "vif*" accept\n'
                "    jump qubes-forward\n"
                "  }\n"
                "  chain prerouting {\n    type filter hook prerouting priority -300;\n    policy accept;\n  }\n"
                "  chain postrouting {\n    type filter hook postrouting priority -300;\n    policy accept;\n  }\n"
                "}\n"
            )
        _nft(text)
        self.reload()
        self.update_connected_ips(4)
        self.update_connected_ips(6)

    def reload(self) -> None:
        """Every target again (lines 364-371, the SIGHUP of a reload)."""
        for addr in self.list_targets():
            self.handle_addr(addr)

    def cleanup(self) -> None:
        """Lines 682-687."""
        _nft(f"delete table ip {TABLE}\ndelete table ip6 {TABLE}\n")

    # --- lines 115-135, 197-198, 309-329: rules from QubesDB --------------------------------------------

    def list_targets(self) -> set[str]:
        return {k.split("/")[2] for k in self.db.multiread("/qubes-firewall/") if k.count("/") >= 2}

    def read_rules(self, target: str) -> list[dict[str, str]]:
        entries = {k.split("/")[3]: v for k, v in self.db.multiread(f"/qubes-firewall/{target}/").items()}
        if "policy" not in entries:
            raise RuleParseError("No 'policy' defined")
        policy = entries.pop("policy")
        rules = []
        for ruleno, text in sorted(entries.items()):
            if len(ruleno) != 4 or not ruleno.isdigit():
                raise RuleParseError(f"Unexpected non-rule found: {ruleno}={text}")
            rule = dict(elem.split("=") for elem in text.split(" "))
            if "action" not in rule:
                raise RuleParseError(f"Rule '{text}' lack action")
            rules.append(rule)
        rules.append({"action": policy})
        return rules

    def handle_addr(self, addr: str) -> None:
        try:
            rules = self.read_rules(addr)
            self.apply_rules(addr, rules)
        except RuleParseError:
            # "Failed to parse rules ..., blocking traffic" (lines 313-318).
            self.apply_rules(addr, [{"action": "drop"}])

    # --- lines 424-427, 439-464, 619-648: one chain per VM ------------------------------------------------

    @staticmethod
    def chain_for_addr(addr: str) -> str:
        return "qbs-" + addr.replace(".", "-").replace(":", "-")

    def apply_rules(self, source: str, rules: list[dict[str, str]]) -> None:
        num = 6 if ":" in source else 4
        family = "ip6" if num == 6 else "ip"
        chain = self.chain_for_addr(source)
        if not _chain_exists(family, chain):
            _nft(f"table {family} {TABLE} {{\n  chain {chain} {{\n  }}\n"
                 f"  chain qubes-forward {{\n    {family} saddr {source} jump {chain}\n  }}\n}}\n")
        _nft(self.prepare_rules(chain, rules, num))

    # --- lines 333-342: the netvm's nameservers ---------------------------------------------------------

    def dns_addresses(self, num: int) -> list[str]:
        out = []
        for line in self.resolv_conf.read_text().splitlines():
            line = line.strip()
            if line.startswith("nameserver"):
                if line.count(".") == 3 and num == 4:
                    out.append(line.split(" ")[1])
                elif line.count(":") and num == 6:
                    out.append(line.split(" ")[1])
        return out

    # --- lines 501-617: a rule list as nft text -----------------------------------------------------------

    def prepare_rules(self, chain: str, rules: list[dict[str, str]], num: int) -> str:
        family = "ip6" if num == 6 else "ip"
        nft_rules = []
        for rule in rules:
            unsupported = set(rule) - set(SUPPORTED)
            if unsupported:
                raise RuleParseError(f"Unsupported rule option(s): {unsupported}")
            if "dst4" in rule and num == 6:
                raise RuleParseError("IPv4 rule found for IPv6 address")
            if "dst6" in rule and num == 4:
                raise RuleParseError("dst6 rule found for IPv4 address")
            text = ""
            if rule["action"] == "accept":
                action = "accept"
            elif rule["action"] == "drop":
                action = f"reject with icmp{'v6' if num == 6 else ''} type admin-prohibited"
            else:
                raise RuleParseError(f"Invalid rule action {rule['action']}")
            if "proto" in rule:
                if num == 4:
                    text += f" ip protocol {rule['proto']}"
                else:
                    text += f" ip6 nexthdr {'icmpv6' if rule['proto'] == 'icmp' else rule['proto']}"
            if "dst4" in rule:
                text += f" ip daddr {rule['dst4']}"
            elif "dst6" in rule:
                text += f" ip6 daddr {rule['dst6']}"
            elif "dsthost" in rule:
                # Resolved at every (re)load (lines 555-560): why a reload re-resolves dsthost= rules.
                try:
                    infos = socket.getaddrinfo(rule["dsthost"], None, socket.AF_INET6 if num == 6 else socket.AF_INET)
                except socket.gaierror as exc:
                    raise RuleParseError(f"Failed to resolve {rule['dsthost']}: {exc}") from None
                hosts = sorted({str(i[4][0]) + ("/128" if num == 6 else "/32") for i in infos})
                text += f" {family} daddr {{ {', '.join(hosts)} }}"
            dstports: str | None = None
            if "dstports" in rule:
                dstports = rule["dstports"]
                if len(set(dstports.split("-"))) == 1:
                    dstports = dstports.split("-")[0]
            if rule.get("specialtarget") == "dns":
                if dstports not in ("53", None):
                    continue
                dstports = "53"
                text += f" {family} daddr @dns-addr"
            if "icmptype" in rule:
                text += f" {'icmpv6' if num == 6 else 'icmp'} type {rule['icmptype']}"
            if dstports is not None:
                if "proto" not in rule:
                    nft_rules += [f"{text} tcp dport {dstports} {action}", f"{text} udp dport {dstports} {action}"]
                else:
                    nft_rules.append(f"{text} {rule['proto']} dport {dstports} {action}")
            else:
                nft_rules.append(f"{text} {action}")
        dns = self.dns_addresses(num)
        return (
            f"flush set {family} {TABLE} dns-addr\n"
            f"{'#' if not dns else ''}add element {family} {TABLE} dns-addr {{ {', '.join(dns)} }}\n"
            f"flush chain {family} {TABLE} {chain}\n"
            f"table {family} {TABLE} {{\n  chain {chain} {{\n   " + "\n   ".join(nft_rules) + "\n  }\n}\n"
        )

    # --- lines 84-88, 466-499: connected addresses --------------------------------------------------------

    def update_connected_ips(self, num: int) -> None:
        family = "ip6" if num == 6 else "ip"
        text = f"flush chain {family} {TABLE} prerouting\nflush chain {family} {TABLE} postrouting\n"
        ips = (self.db.read("/connected-ips6" if num == 6 else "/connected-ips") or "").split()
        if ips:
            addr = "{" + ", ".join(ips) + "}"
            text += (
                f"table {family} {TABLE} {{\n"
                f'  chain prerouting {{\n    iifname != "vif*" {family} saddr {addr} drop\n  }}\n'
                f'  chain postrouting {{\n    oifname != "vif*" {family} daddr {addr} drop\n  }}\n'
                "}\n"
            )
        _nft(text)

    # --- what the stand-in enforces ------------------------------------------------------------------------

    @staticmethod
    def tables() -> str:
        """The service's two tables as nft lists them, counters stripped."""
        out = []
        for family in ("ip", "ip6"):
            proc = subprocess.run(["nft", "list", "table", family, TABLE], capture_output=True, text=True)
            out.append(proc.stdout if proc.returncode == 0 else f"table {family} {TABLE} MISSING\n")
        return re.sub(r"counter packets \d+ bytes \d+", "counter", "".join(out))

    @staticmethod
    def check(expected_tables: str) -> None:
        """Raise unless every VM interface is one the service filters and its tables are as it left them."""
        links = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True,
                                          check=True).stdout)
        for link in links:
            # ``group`` is the name of interface group 2 in /etc/iproute2/group, or its number.
            if str(link.get("group")) == "2" and not str(link["ifname"]).startswith("vif"):
                raise AssertionError(f"VM interface {link['ifname']} bypasses qubes-firewall: it filters "
                                     'only iifname "vif*" (qubesagent/firewall.py line 662)')
        now = FirewallService.tables()
        if now != expected_tables:
            raise AssertionError(f"qubes-firewall's tables were changed by someone else:\n{now}\n"
                                 f"instead of\n{expected_tables}")


def install_tools(tools: Path, db: QubesDb, resolv_conf: Path, calls: Path) -> None:
    """``qubesdb-read`` and a recording ``systemctl`` in ``tools`` (root-owned, writable by root alone)."""
    tools.mkdir(mode=0o755, exist_ok=True)
    os.chmod(tools, 0o755)
    python = shlex.quote(sys.executable)
    root = shlex.quote(str(Path(__file__).resolve().parents[2]))
    here = f"cd {root} && exec {python} -m tests.functional.qubes_standin"
    scripts = {
        "qubesdb-read": f"#!/bin/sh\n{here} --db {shlex.quote(str(db.path))} read \"$@\"\n",
        "systemctl": (
            "#!/bin/sh\n"
            f"echo \"$*\" >> {shlex.quote(str(calls))}\n"
            'if [ "$*" = "--no-block try-reload-or-restart qubes-firewall.service" ]; then\n'
            f"  {here} --db {shlex.quote(str(db.path))} --resolv-conf {shlex.quote(str(resolv_conf))} reload\n"
            "fi\n"
        ),
    }
    for name, text in scripts.items():
        path = tools / name
        path.write_text(text)
        path.chmod(0o755)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qubes_standin")
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"))
    p.add_argument("command", choices=("read", "init", "reload"))
    p.add_argument("paths", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    db = QubesDb(args.db)
    if args.command == "read":
        # As qubes-core-qubesdb's client/qubesdb-cmd.c cmd_read: -f prints "path = value", -q keeps
        # quiet about a missing path; a missing path prints nothing and makes the status 2.
        opts = {x for x in args.paths if x.startswith("-") and x != "--"}
        paths = [x for x in args.paths if not x.startswith("-")]
        failed = False
        for path in paths:
            value = db.read(path)
            if value is None:
                failed = True
                if "-q" not in opts:
                    sys.stderr.write(f"Failed to read {path}\n")
                continue
            sys.stdout.write(f"{path} = {value}\n" if "-f" in opts else f"{value}\n")
        return 2 if failed else 0
    service = FirewallService(db, args.resolv_conf)
    service.init() if args.command == "init" else service.reload()
    return 0


if __name__ == "__main__":
    sys.exit(main())

