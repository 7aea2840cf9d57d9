"""A real libvirt lab: libvirtd daemons inside the vmm_linux lab's host
namespaces and a tiny TCG guest whose NIC is a tap on the host's VN bridge,
so real live migrations (QEMU, libvirt events, RARP) happen on the lab's NVEs.

Modules:
  guest    builds (and caches) the guest's initramfs; ICMP echo probes that
           measure delivery to the guest in the probe.py log format
  hosts    LibvirtHost: one libvirtd per lab host namespace
  domain   the guest's domain XML
  migrate  peer-to-peer live migration, abort and failure helpers

Lab only: the daemons accept unauthenticated TCP connections on the lab's
underlay addresses (auth_tcp="none"). Never point this at a real network.
"""

from __future__ import annotations

from vmm_orchestrator.errors import VmmError


class LibvirtLabError(VmmError):
    """A step of the libvirt lab failed; the message says which and why."""
