"""Living beside Qubes' own services in a Qubes VM: telling one is, and what they expect of us.

In a Qubes netvm this package shares the kernel with Qubes' firewall service
(``qubes-firewall.service``, ``qubesagent/firewall.py``: tables ``ip
qubes-firewall`` and ``ip6 qubes-firewall``) and with its network service
(``qubes-network.service``). Their contract, from qubes-core-agent-linux:

* the firewall service keys every per-VM rule on ``iifname "vif*"``
  (``meta iifname != "vif*" accept`` in its ``forward`` chain, and its
  connected-ips rules): a VM interface named otherwise bypasses it, so
  :func:`check_vifname` refuses such a ``vifname`` here;
* it keeps the netvm's nameservers in its ``dns-addr`` set and reads them
  again only when reloaded, which Qubes' DNS script asks systemd for after
  every change (``network/qubes-setup-dnat-to-ns``); :func:`reload_firewall_service`
  does the same for this package's DNS tool and ``init``.

Nothing here raises for a missing systemd: a netvm without it has no such
service to reload.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import subprocess

from ..core.errors import InvalidInput
from .settings import Settings

log = logging.getLogger(__name__)

#: Every Qubes VM has it (``qubes-core-agent-linux``'s packages install it);
#: unit tests point it elsewhere.
MARKER_VM = "/usr/share/qubes/marker-vm"
#: The prefix Qubes' firewall service matches VM interfaces with (``"vif*"``
#: in ``qubesagent/firewall.py`` ``init`` and ``update_connected_ips``).
QUBES_VIF_PREFIX = "vif"
FIREWALL_UNIT = "qubes-firewall.service"
#: ``systemctl --no-block`` only queues the job; this bounds a hung manager.
SYSTEMCTL_TIMEOUT = 5.0
#: systemctl's exit status for a unit that is not loaded (``EXIT_PROGRAM_NOT_INSTALLED``, LSB 5).
SYSTEMCTL_NO_SUCH_UNIT = 5
#: sd_booted(3): systemd runs this system exactly when this directory exists.
SYSTEMD_RUNNING = "/run/systemd/system"


@functools.cache
def _qubesdb_module() -> bool:
    # Qubes' own Python client (``import qubesdb``) is in every Qubes VM;
    # looked for once per process, never imported.
    try:
        return importlib.util.find_spec("qubesdb") is not None
    except (ImportError, ValueError):
        return False


def in_qubes_vm(settings: Settings) -> bool:
    """Whether this domain is a Qubes VM: QubesDB is there (``qubesdb-read`` on the tool path, or
    Qubes' ``qubesdb`` module) or Qubes' VM marker file is."""
    return settings.qubesdb_read is not None or _qubesdb_module() or os.path.exists(MARKER_VM)


def check_vifname(vifname: str) -> None:
    """Refuse, in a Qubes VM, a ``vifname`` Qubes' firewall service would not see as a VM's.

    Its ``forward`` chain accepts whatever does not come in on ``vif*`` before
    any per-VM rule, so a VM behind ``work-vm`` would pass its firewall
    unfiltered. Raises ``InvalidInput``.
    """
    if not vifname.startswith(QUBES_VIF_PREFIX):
        raise InvalidInput(
            f"invalid vifname {vifname!r}: in a Qubes VM a VM interface's name must start with "
            f"{QUBES_VIF_PREFIX!r} (Qubes' firewall service filters only iifname \"vif*\")"
        )


def reload_firewall_service(settings: Settings, why: str) -> None:
    """Ask systemd to reload Qubes' firewall service if it runs, without waiting. Never raises.

    ``systemctl --no-block try-reload-or-restart qubes-firewall.service``, as
    Qubes' DNS script runs it: "try" leaves a unit that is not running alone,
    so this is a no-op where the service is off or absent. ``systemctl``
    comes from the settings' fixed tool path; no systemctl, no systemd, a
    unit that does not exist or a hung manager are logged and ignored.
    """
    exe = shutil.which("systemctl", path=settings.path)
    if exe is None:
        log.debug("no systemctl: %s not asked to reload (%s)", FIREWALL_UNIT, why)
        return
    argv = [exe, "--no-block", "try-reload-or-restart", FIREWALL_UNIT]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SYSTEMCTL_TIMEOUT, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask systemd to reload %s (%s): %s", FIREWALL_UNIT, why, exc)
        return
    if proc.returncode == 0:
        log.info("asked systemd to reload %s (%s)", FIREWALL_UNIT, why)
        return
    detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0][:200]
    if proc.returncode != SYSTEMCTL_NO_SUCH_UNIT and os.path.isdir(SYSTEMD_RUNNING):
        log.warning("systemd did not reload %s (%s): %s", FIREWALL_UNIT, why, detail)
    else:
        log.debug("%s not reloaded (%s): %s", FIREWALL_UNIT, why, detail)
