#!/usr/bin/env bash
# Install vif-hotplug on a real driver domain (Debian-like), as root.
#   sudo ./install.sh            PREFIX defaults to /opt/vif-hotplug
#   sudo PREFIX=/opt/x ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
PREFIX="${PREFIX:-/opt/vif-hotplug}"

python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check .
for tool in vif-route-qubes qubes-setup-dnat-to-ns vif-hotplug; do
    ln -sf "$PREFIX/bin/$tool" "/usr/local/bin/$tool"
done

install -d /etc/xen/scripts /etc/udev/rules.d /etc/vif-hotplug
sed "s|/opt/vif-hotplug|$PREFIX|" etc/xen/scripts/vif-route-qubes > /etc/xen/scripts/vif-route-qubes
chmod 0755 /etc/xen/scripts/vif-route-qubes
install -m 0644 udev/60-vif-hotplug.rules /etc/udev/rules.d/
if [ -d /etc/NetworkManager/dispatcher.d ]; then
    install -m 0755 etc/NetworkManager/dispatcher.d/qubes-nmhook /etc/NetworkManager/dispatcher.d/
fi
if [ -d /etc/systemd/system ]; then
    install -m 0644 etc/systemd/system/vif-hotplug-init.service /etc/systemd/system/
    # Not enabled: for netvms without NetworkManager (which has the dispatcher hook).
    install -m 0644 etc/systemd/system/vif-hotplug-dns-watch.service /etc/systemd/system/
    systemctl daemon-reload 2>/dev/null || true
    systemctl enable vif-hotplug-init.service 2>/dev/null || true
fi
echo "installed into $PREFIX; configure /etc/vif-hotplug/netvm.conf unless QubesDB/XenStore provide the netvm parameters"
