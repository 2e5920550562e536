#!/usr/bin/env bash
# Build the Debian packages from this checkout and install them with apt, as root.
#
#   sudo ./install.sh          vif-hotplug (the runtime)
#   sudo ./install.sh --lab    vif-hotplug and vif-hotplug-lab (the lab, the embedded xenstored)
#
# The build runs in a temporary copy of the checkout (the checkout is never
# written); apt then installs the .deb files and Debian's own packages they
# depend on (python3-pyroute2, python3-nftables, python3-iptables, ...): no
# pip, no virtualenv, no compiler on the driver domain. Nothing goes to
# /usr/local or /opt. See docs/install.md for what the package enables and
# for the install in a Qubes template.
set -euo pipefail
cd "$(dirname "$0")"

lab=
case "${1:-}" in
    "") ;;
    --lab) lab=yes ;;
    *) echo "usage: sudo ./install.sh [--lab]" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (apt-get install)" >&2
    exit 1
fi

# Debian's tools and interpreter, whatever PATH the caller has (a python3 of a
# version manager has neither Debian's modules nor its build plugins).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
build_deps=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel git)
missing=()
for pkg in "${build_deps[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d /var/tmp/vif-hotplug-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"
if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard | grep -zv '^\.venv' | tar --null -cf - -T - | tar -C "$work/src" -xf -
else
    tar --exclude='./.venv*' --exclude='*/__pycache__' -cf - . | tar -C "$work/src" -xf -
fi
(cd "$work/src" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) || {
    tail -40 "$work/build.log" >&2
    echo "install.sh: the package build failed (log above)" >&2
    exit 1
}

debs=("$work"/vif-hotplug_*_all.deb)
if [ -n "$lab" ]; then
    debs+=("$work"/vif-hotplug-lab_*_all.deb)
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y "${debs[@]}"
echo "install.sh: installed ${debs[*]##*/}; next: /etc/vif-hotplug/netvm.conf and docs/install.md"
