#!/usr/bin/env bash
# Installs what vmm-orchestrator needs on a Debian machine (run as root):
# the kernel tools the lab drives, and a virtual environment with the
# project and its test tools. Safe to run again; quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The lab's kernel tools; libvirt + QEMU and a guest kernel for the real
# migrations (libvirt-dev, pkg-config and gcc build libvirt-python); etcd for
# the distributed directory; shellcheck for the DevStack plugin; openssl for
# the state service's TLS test; OVN and Open vSwitch for the OVN lab.
APT_PACKAGES=(
  iproute2 nftables conntrack iputils-ping procps python3-venv python3-dev
  gcc pkg-config libvirt-dev libvirt-daemon-system libvirt-clients
  qemu-system-x86 qemu-utils qemu-guest-agent busybox-static tini linux-image-amd64
  etcd-server etcd-client shellcheck openssl
  ovn-central ovn-host openvswitch-switch
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PYTHON is older than Python 3.11; set PYTHON to a 3.11+ interpreter" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat setup.py setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Real Keystone and Neutron for the tests in tests/openstack (their own venv,
# so that their pinned dependencies never meet the product's).
bash scripts/setup-openstack.sh
