"""Domain XML of the tiny lab guest.

Software emulation (``type='qemu'``, CPU ``qemu64``): this machine's
/dev/kvm is a nested device that stock guest kernels fail under. Direct
kernel boot of the cached initramfs, whose /init takes its addresses from
the command line. The NIC is a virtio tap on the host's VN bridge with a
fixed MAC and a fixed tap name, so the port the NVE sees is the same on
every host the guest migrates to. The serial console goes to a file under
/var/log/libvirt, which each lab host has its own copy of, so every host
keeps the console output of its own run of the guest.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from vmm_lab.libvirt.guest import GuestImage, kernel_cmdline

IFNAMSIZ = 15
QEMU = "/usr/bin/qemu-system-x86_64"


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """What differs between lab guests: identity, VN bridge and addresses."""

    name: str
    mac: str
    bridge: str
    ipv4: str | None = None
    ipv6: str | None = None
    gateway4: str | None = None
    gateway6: str | None = None
    memory_mib: int = 128
    mtu: int = 1450

    def __post_init__(self) -> None:
        if len(self.tap) > IFNAMSIZ:
            raise ValueError(f"tap name {self.tap!r} is longer than {IFNAMSIZ} characters")

    @property
    def tap(self) -> str:
        """The tap device's name on whichever host runs the guest."""
        return f"tap-{self.name}"

    @property
    def console_log(self) -> str:
        """Serial console file, as the daemon sees it (``LibvirtHost.path`` maps it)."""
        return f"/var/log/libvirt/qemu/{self.name}-console.log"


def domain_xml(spec: GuestSpec, image: GuestImage) -> str:
    """The libvirt domain definition of ``spec`` booting ``image``."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = image.kernel
    ET.SubElement(os_, "initrd").text = image.initrd
    ET.SubElement(os_, "cmdline").text = kernel_cmdline(
        spec.ipv4, spec.ipv6, spec.gateway4, spec.gateway6
    )
    cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
    ET.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "emulator").text = QEMU
    nic = ET.SubElement(dev, "interface", type="bridge")
    ET.SubElement(nic, "source", bridge=spec.bridge)
    ET.SubElement(nic, "mac", address=spec.mac)
    ET.SubElement(nic, "target", dev=spec.tap)
    ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(nic, "mtu", size=str(spec.mtu))
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=spec.console_log)
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(dev, "console", type="file")
    ET.SubElement(console, "source", path=spec.console_log)
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(dev, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(dev, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")
