"""The agent's QubesDB watcher: what changes in QubesDB takes effect while no event asks for it.

A thread of the resident agent waits on the agent's one QubesDB connection
(:class:`~vif_hotplug.xen.qubesdb.QubesDBCache`) and compares what QubesDB
holds with what it held last (the first values anyone of the agent read,
so a change made while the agent started is not missed):

* ``/connected-ips``, ``/connected-ips6`` changed (a VM started using this
  netvm, or stopped): the agent runs ``vif-hotplug connected-ips``, as a
  client would ask it; no timer polls QubesDB.
* ``/mapped-ip/<ip>/visible-ip`` or ``visible-gateway`` appeared or changed
  (Qubes issue 9318: dom0 may write a VM's mapping after its vif came
  online): the agent runs ``vif-route-qubes online`` again for the vif
  whose XenStore ``ip`` has ``<ip>`` as its first IPv4 address and that
  XenStore marks online with its device present, as the toolstack would
  run it; online builds the NAT namespace. A mapping that went away stays
  until the vif comes online again (logged).
* Anything else it watches (the netvm's parameters, ``/qubes-ip*``, the
  services): logged; every event reads it anew anyway.

Work is handed to the agent (``submit``), which runs it in the lane of
the same command or vif, after what is already queued there.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from ipaddress import IPv4Network

from ..core.errors import HotplugError, InvalidInput
from ..core.validation import parse_vm_addresses
from ..xen.qubesdb import CONNECTED_KEYS, QubesDBCache, QubesDBError, Snapshot
from ..xen.xenstore_port import XenStoreTree
from .reconcile import online_vifs

log = logging.getLogger(__name__)

#: ``submit(prog, argv, extra_env, still_wanted)``: run ``prog argv`` in the agent as a client's
#: request would run, with the agent's environment and ``extra_env``, if ``still_wanted()`` says
#: so when its turn comes.
Submit = Callable[[str, list[str], dict[str, str], Callable[[], bool]], None]
#: A XenStore connection for one use (``with``).
OpenXenStore = Callable[[], AbstractContextManager[XenStoreTree]]
#: After an error, how long before QubesDB is asked again.
RETRY = 2.0


def changed_keys(old: Snapshot, new: Snapshot) -> set[str]:
    keys = set(old.values) | set(new.values)
    return {k for k in keys if old.values.get(k) != new.values.get(k)}


def mapped_real_addresses(keys: set[str]) -> set[str]:
    """The real addresses whose mapping ``keys`` touch (``/mapped-ip/<ip>/visible-ip`` ...)."""
    out = set()
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[1] == "mapped-ip" and parts[3] in ("visible-ip", "visible-gateway"):
            out.add(parts[2])
    return out


def vifs_with_address(xs: XenStoreTree, real_ip: str) -> list[tuple[str, str]]:
    """(XENBUS_PATH, vif name) of every vif online in XenStore whose first IPv4 address is ``real_ip``."""
    out = []
    for vif in online_vifs(xs):
        try:
            networks = parse_vm_addresses(xs.read(f"{vif.xenbus_path}/ip") or "")
        except InvalidInput:
            continue
        first = next((n for n in networks if n.version == 4), None)
        if first is not None and isinstance(first, IPv4Network) and str(first.network_address) == real_ip:
            out.append((vif.xenbus_path, vif.name))
    return out


def device_exists(name: str) -> bool:
    """Whether this network namespace has a device ``name`` (the thread's own namespace, as netlink sees it)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class QubesDBWatcher:
    """See the module's docstring."""

    def __init__(self, cache: QubesDBCache, open_xenstore: OpenXenStore, submit: Submit) -> None:
        self._cache = cache
        self._open_xenstore = open_xenstore
        self._submit = submit
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qubesdb-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        os.write(self._stop_w, b"x")
        self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._stop_r)
            os.close(self._stop_w)

    def _run(self) -> None:
        last: Snapshot | None = None
        failure: str | None = None
        while not self._stopping:
            try:
                now = self._cache.snapshot()
                failure = None
            except QubesDBError as exc:
                if str(exc) != failure:
                    log.error("watching QubesDB: %s (trying again every %gs)", exc, RETRY)
                failure = str(exc)
                self._cache.wait(self._stop_r, RETRY, RETRY)
                continue
            if now is not None:
                if last is None:
                    last = self._cache.first or now
                if now != last:
                    try:
                        self.changed(last, now)
                    except HotplugError as exc:  # XenStore: the same change is handled again shortly
                        log.error("applying a QubesDB change: %s (trying again in %gs)", exc, RETRY)
                        self._cache.wait(self._stop_r, RETRY, RETRY)
                        continue
                    last = now
            self._cache.wait(self._stop_r, None, RETRY)

    def changed(self, old: Snapshot, new: Snapshot) -> None:
        """Hand to the agent what the change from ``old`` to ``new`` asks for. Raises ``HotplugError``
        (XenStore)."""
        keys = changed_keys(old, new)
        if keys & set(CONNECTED_KEYS):
            log.info("QubesDB: connected addresses changed: bringing the connected sets up to date")
            self._submit("vif-hotplug", ["connected-ips"], {}, lambda: True)
        mapped = mapped_real_addresses(keys)
        if mapped:
            self._remap(mapped, new)
        rest = sorted(k for k in keys if k not in CONNECTED_KEYS and not k.startswith("/mapped-ip/"))
        if rest:
            log.info("QubesDB: %s changed: every event from now on reads the new value", " ".join(rest))

    def _remap(self, addresses: set[str], new: Snapshot) -> None:
        with self._open_xenstore() as xs:
            for real in sorted(addresses):
                if new.values.get(f"/mapped-ip/{real}/visible-ip") is None:
                    log.info("QubesDB: the mapping of %s went away: its vif keeps it until it comes online again",
                             real)
                    continue
                vifs = vifs_with_address(xs, real)
                if not vifs:
                    log.debug("QubesDB: mapping of %s changed: no vif online with that address", real)
                for xenbus_path, name in vifs:
                    log.info("%s: QubesDB mapping of %s changed: bringing the vif online again", name, real)
                    self._submit("vif-route-qubes", ["online", "type_if=vif"],
                                 _toolstack_env(xenbus_path, name), self._still_online(xenbus_path, name))

    def _still_online(self, xenbus_path: str, name: str) -> Callable[[], bool]:
        """When its turn comes: the vif is still online in XenStore and its device is here (an offline
        queued before it must not be undone, a vif without a device must not be reported as failed)."""

        def check() -> bool:
            with self._open_xenstore() as xs:
                if xs.read(f"{xenbus_path}/online") != "1":
                    return False
                vifname = xs.read(f"{xenbus_path}/vifname")
            return any(device_exists(dev) for dev in (vifname, name) if dev)

        return check


def _toolstack_env(xenbus_path: str, name: str) -> dict[str, str]:
    """What libxl's ``xl devd`` gives a vif script (/work/shared/README.md section 1)."""
    return {"XENBUS_PATH": xenbus_path, "XENBUS_TYPE": "vif", "XENBUS_BASE_PATH": "backend", "vif": name,
            "script": "/etc/xen/scripts/vif-route-qubes", "netdev": ""}

