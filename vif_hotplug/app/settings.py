"""Everything a command takes from its environment, parsed once at the entry point.

Nothing below the entry points reads ``os.environ``: use cases and adapters
get a :class:`Settings`. Environment variables (all optional):

==========================  =================================================
``VIF_HOTPLUG_CONF``        netvm.conf (default ``/etc/vif-hotplug/netvm.conf``)
``VIF_HOTPLUG_HOOKS_DIR``   hooks directory (overrides netvm.conf ``hooks_dir``)
``VIF_HOTPLUG_LOCK``        the hotplug lock (default ``/run/vif-hotplug.lock``)
``VIF_HOTPLUG_STATE_DIR``   runtime state: backend marker, nftables and DNS
                            locks (default ``/run/vif-hotplug``)
``VIF_HOTPLUG_AGENT_SOCKET``  the agent's socket (default ``/run/vif-hotplug/agent.sock``)
``VIF_HOTPLUG_TOOLS_DIR``   a directory searched before the fixed search path
                            for the tools this package runs (tests, unusual
                            installs): owned by root, writable by root alone,
                            else ignored with a warning
``XTABLES_LOCKFILE``        the lock ``iptables -w`` takes (default ``/run/xtables.lock``)
``XENSTORED_PATH``          XenStore's socket or device (default: xenstored's socket, else ``/dev/xen/xenbus``)
==========================  =================================================

``PATH`` is not read: the tools this package runs (``iptables``,
``qubesdb-read``, ``busctl``, ``systemctl``, ``modprobe``) are looked up on
:data:`DEFAULT_PATH`, whoever started the command, so the resident agent and
a process of the toolstack's run the same programs.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..core.errors import InvalidInput
from ..core.netvm_params import DEFAULT_HOOKS_DIR, NetvmConf, parse_conf

log = logging.getLogger(__name__)

DEFAULT_CONF = "/etc/vif-hotplug/netvm.conf"
DEFAULT_LOCK = "/run/vif-hotplug.lock"
DEFAULT_STATE_DIR = "/run/vif-hotplug"
DEFAULT_XTABLES_LOCK = "/run/xtables.lock"
#: Debian's own directories only: /usr/local is per-qube storage in a template-based qube.
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: How long any lock (hotplug, xtables, nftables, DNS) is waited for. libxl
#: gives a hotplug script 40 s (LIBXL_HOTPLUG_TIMEOUT): a client that waited
#: for the agent (``agent.client.TIMEOUT``) and then does the work itself must
#: still report within that, so the agent's own waits are shorter than the
#: client's patience and the fallback's fit what is left.
AGENT_LOCK_TIMEOUT = 8.0
FALLBACK_LOCK_TIMEOUT = 20.0
LOCK_TIMEOUT = FALLBACK_LOCK_TIMEOUT
XENSTORE_TIMEOUT = 5.0


def _absolute(value: str, what: str) -> str:
    if not value.startswith("/") or "\0" in value or len(value) > 4096:
        raise InvalidInput(f"invalid {what} {value[:64]!r}: not an absolute path")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    conf_path: str = DEFAULT_CONF
    #: netvm.conf parsed, ``None`` when absent or broken (see ``conf_error``).
    conf: NetvmConf | None = None
    #: Why netvm.conf could not be used: fatal for online, init and DNS;
    #: offline logs it and removes what the kernel holds for the vif.
    conf_error: str | None = None
    hooks_dir: str = DEFAULT_HOOKS_DIR
    backend_choice: str = "auto"
    hotplug_lock: str = DEFAULT_LOCK
    state_dir: str = DEFAULT_STATE_DIR
    agent_socket: str = f"{DEFAULT_STATE_DIR}/agent.sock"
    xtables_lock: str = DEFAULT_XTABLES_LOCK
    xenstore_path: str | None = None
    xenstore_timeout: float = XENSTORE_TIMEOUT
    lock_timeout: float = LOCK_TIMEOUT
    qubesdb_read: str | None = None
    path: str = DEFAULT_PATH

    @property
    def nftables_lock(self) -> str:
        return os.path.join(self.state_dir, "nftables.lock")

    @property
    def dns_lock(self) -> str:
        return os.path.join(self.state_dir, "dns.lock")

    def with_backend(self, choice: str | None) -> Settings:
        """``--backend`` on the command line wins over netvm.conf."""
        if choice is None:
            return self
        if choice not in ("auto", "nftables", "iptables"):
            raise InvalidInput(f"invalid backend {choice!r}: expected auto, nftables or iptables")
        return replace(self, backend_choice=choice)


def read_conf_text(path: str) -> tuple[str | None, str | None]:
    """(text, error) of the config file; (None, None) when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read config {path}: {exc}"


def _trusted_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Parse and validate the environment and netvm.conf. Raises ``InvalidInput`` for a bad path."""
    conf_path = _absolute(env.get("VIF_HOTPLUG_CONF") or DEFAULT_CONF, "VIF_HOTPLUG_CONF")
    text, error = read_conf_text(conf_path)
    conf = None
    if text is not None:
        try:
            conf = parse_conf(text, conf_path)
        except InvalidInput as exc:
            error = str(exc)
    hooks_dir = env.get("VIF_HOTPLUG_HOOKS_DIR") or (conf.hooks_dir if conf and conf.hooks_dir else DEFAULT_HOOKS_DIR)
    state_dir = _absolute(env.get("VIF_HOTPLUG_STATE_DIR") or DEFAULT_STATE_DIR, "VIF_HOTPLUG_STATE_DIR")
    path = DEFAULT_PATH
    tools_dir = env.get("VIF_HOTPLUG_TOOLS_DIR")
    if tools_dir:
        if _trusted_dir(_absolute(tools_dir, "VIF_HOTPLUG_TOOLS_DIR")):
            path = f"{tools_dir}:{DEFAULT_PATH}"
        else:
            log.warning("ignoring VIF_HOTPLUG_TOOLS_DIR %s: not a directory owned and writable by root alone",
                        tools_dir[:64])
    return Settings(
        conf_path=conf_path,
        conf=conf,
        conf_error=error,
        hooks_dir=_absolute(hooks_dir, "hooks directory"),
        backend_choice=(conf.backend if conf and conf.backend else "auto"),
        hotplug_lock=_absolute(env.get("VIF_HOTPLUG_LOCK") or DEFAULT_LOCK, "VIF_HOTPLUG_LOCK"),
        state_dir=state_dir,
        agent_socket=_absolute(env.get("VIF_HOTPLUG_AGENT_SOCKET") or os.path.join(state_dir, "agent.sock"),
                               "VIF_HOTPLUG_AGENT_SOCKET"),
        xtables_lock=_absolute(env.get("XTABLES_LOCKFILE") or DEFAULT_XTABLES_LOCK, "XTABLES_LOCKFILE"),
        xenstore_path=env.get("XENSTORED_PATH") or None,
        qubesdb_read=shutil.which("qubesdb-read", path=path),
        path=path,
    )
