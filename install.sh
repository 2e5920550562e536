#!/usr/bin/env bash
# Install vif-hotplug on a real driver domain (Debian-like), as root.
#   sudo ./install.sh            PREFIX defaults to /opt/vif-hotplug
#   sudo PREFIX=/opt/x ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
PREFIX="${PREFIX:-/opt/vif-hotplug}"

# libnftables (the nftables backend) and the legacy xtables libraries
# python-iptables loads (the iptables backend).
if command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnftables1 iptables ipset conntrack >/dev/null
fi
python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check .
# The thin client, a module importable without site-packages (python3 -I -S),
# byte-compiled here; the tools on PATH start it, not the full package: the
# agent does the work when it runs (README, Resident agent).
install -d "$PREFIX/libexec"
install -m 0644 vif_hotplug/agent/client.py "$PREFIX/libexec/vif_hotplug_client.py"
"$PREFIX/bin/python" -m compileall -q "$PREFIX/libexec"
for tool in vif-route-qubes qubes-setup-dnat-to-ns vif-hotplug; do
    rm -f "/usr/local/bin/$tool"
    cat > "/usr/local/bin/$tool" <<WRAPPER
#!/bin/sh
exec "$PREFIX/bin/python3" -I -S -c 'import sys; sys.path[0:0] = [sys.argv.pop(1)]; import vif_hotplug_client; vif_hotplug_client.main()' "$PREFIX/libexec" $tool "\$@"
WRAPPER
    chmod 0755 "/usr/local/bin/$tool"
done

install -d /etc/xen/scripts /etc/udev/rules.d /etc/vif-hotplug
sed "s|/opt/vif-hotplug|$PREFIX|" etc/xen/scripts/vif-route-qubes > /etc/xen/scripts/vif-route-qubes
chmod 0755 /etc/xen/scripts/vif-route-qubes
install -m 0644 udev/60-vif-hotplug.rules /etc/udev/rules.d/
if [ -d /etc/NetworkManager/dispatcher.d ]; then
    install -m 0755 etc/NetworkManager/dispatcher.d/qubes-nmhook /etc/NetworkManager/dispatcher.d/
fi
if [ -d /etc/systemd/system ]; then
    for unit in vif-hotplug-init.service vif-hotplug-agent.socket vif-hotplug-agent.service \
                vif-hotplug-dns-watch.service; do
        install -m 0644 "etc/systemd/system/$unit" /etc/systemd/system/
    done
    systemctl daemon-reload 2>/dev/null || true
    systemctl enable vif-hotplug-init.service vif-hotplug-agent.socket 2>/dev/null || true
    # vif-hotplug-dns-watch.service is not enabled: it is for netvms without
    # NetworkManager (which has the dispatcher hook).
fi
echo "installed into $PREFIX; configure /etc/vif-hotplug/netvm.conf unless QubesDB/XenStore provide the netvm parameters"
