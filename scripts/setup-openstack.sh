#!/usr/bin/env bash
# Installs real OpenStack services (Keystone, Neutron, Nova, Placement) from PyPI into their own
# virtual environment, .venv-openstack, for the real-OpenStack test tier
# (tests/openstack/). A separate environment, because the services pin their
# dependencies (oslo.*, SQLAlchemy, WebOb ...) to one release series and must
# never fight the product's .venv. The product reaches them only over HTTP.
# Safe to run again; quick when nothing is missing (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."

# One OpenStack release series: Keystone 30, Neutron 29, Nova 34 and
# Placement 16 (2026.2).
OPENSTACK_PACKAGES=(
  "keystone==30.0.0"
  "neutron==29.0.0"
  "nova==34.0.0"
  "openstack-placement==16.0.0"
)

PYTHON="${PYTHON:-python3}"
VENV=.venv-openstack
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(printf '%s\n' "${OPENSTACK_PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup-openstack: installing ${OPENSTACK_PACKAGES[*]} into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "${OPENSTACK_PACKAGES[@]}"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
