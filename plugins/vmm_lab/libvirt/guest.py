"""The tiny lab guest: a Debian kernel plus a cached busybox initramfs, and
the probes that measure delivery to it.

The initramfs holds static busybox, the virtio modules of the chosen kernel
(loaded in ``MODULES`` order: another order fails with unknown symbols),
Debian's ``qemu-ga`` with the shared libraries ``ldd`` names, and an /init
that loads the modules, configures eth0 from the kernel command line (see
``kernel_cmdline``; the MAC comes from the domain XML), starts the guest agent
on the virtio port ``org.qemu.guest_agent.0`` and prints ``READY_MARK`` on
the serial console once the network is up.

It is built once per set of inputs: the cache key hashes the kernel version,
every copied file's bytes and the /init text, so a later run (or another
test) reuses the image and a changed input builds a new one beside it.

Measuring delivery to the guest. The lab's probes (vmm_lab.linux.probe)
count what arrives in the VM; a real guest cannot run that receiver (no
Python, and this busybox has neither ``udpsvd`` nor a UDP ``nc``). The guest
kernel itself is the receiver instead: every ICMP echo request that reaches
it is answered at once, in softirq context, with the request's payload
copied verbatim. ``echo_probes`` sends echo requests whose payload is a
probe packet (``probe.encode``: stream, seq, send time) and decodes each
reply back into a ``probe.Recv`` stamped on arrival, so its ``SendLog`` and
``RecvLog`` feed ``probe.analyze`` unchanged. A probe counts as delivered
only if the guest got it *and* its answer came back, so a loss on either
leg is a loss; only the forward leg is disturbed by a migration (the peers
do not move, and the guest keeps its neighbour cache). The guest disables
ICMP rate limiting, so replies are never throttled at probe rates.

Lost-after-resume with the real guest, as probe.analyze defines it::

    sent, got = echo_probes(peer_netns, guest_ip, rate, duration, "vm2-v4")  # in a thread
    record = migrate.migrate(guest, src_host, dst_host)   # meanwhile
    probe.analyze(sent, got.records,
                  int(record.paused_at * 1e9), int(record.resumed_at * 1e9))

The pause window comes from libvirt's SUSPENDED/RESUMED events; a strict
count ends it at the first RARP on the destination's tap instead
(``migrate.RarpWatch``; see vmm_lab.libvirt.migrate for how the marks
relate). All times are CLOCK_MONOTONIC, shared by every namespace.
``python -m vmm_lab.libvirt.guest echo`` writes the same two logs as
probe.py's send/recv, for probes run as separate processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from vmm_kernel.netns import socket_in
from vmm_lab.libvirt import LibvirtLabError
from vmm_lab.linux import probe

#: Load order of the guest's kernel modules (dependencies first).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
)
#: Printed on the serial console by /init once eth0 has its addresses.
READY_MARK = "vmm-guest: ready"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
BUSYBOX = "/bin/busybox"
QEMU_GA = "/usr/sbin/qemu-ga"
DEFAULT_CACHE = os.environ.get("VMM_LIBVIRT_LAB_CACHE", "/var/tmp/vmm-libvirt-lab")
# Bump when the image layout changes in a way the inputs do not show.
FORMAT = "vmm-lab-guest/1"

INIT = f"""#!/bin/sh
# /init of the vmm lab guest; see vmm_lab.libvirt.guest.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /var/run
arg() {{
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1"=*) echo "${{w#*=}}" ;; esac
  done
}}
# Before the modules create eth0, so that it inherits the defaults (no DAD:
# the address is usable at once). Replies must never be throttled: the guest
# kernel is the probe receiver.
for s in net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0 \\
         net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \\
         net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0; do
  sysctl -qw "$s"
done
for m in {" ".join(MODULES)}; do
  insmod /lib/modules/guest/$m.ko || echo "vmm-guest: insmod $m failed"
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip link set lo up
ip link set eth0 up
ip4=$(arg vmm_ip4); ip6=$(arg vmm_ip6); gw4=$(arg vmm_gw4); gw6=$(arg vmm_gw6)
[ -n "$ip4" ] && ip addr add "$ip4" dev eth0
[ -n "$ip6" ] && ip -6 addr add "$ip6" dev eth0
[ -n "$gw4" ] && ip route add default via "$gw4"
[ -n "$gw6" ] && ip -6 route add default via "$gw6"
port=
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = {AGENT_PORT_NAME} ] && port=/dev/${{p##*/}}
done
if [ -n "$port" ]; then
  mkdir -p /run/qga
  qemu-ga -m virtio-serial -p "$port" -t /run/qga -f /run/qga/pid &
else
  echo "vmm-guest: no {AGENT_PORT_NAME} port, guest agent not started"
fi
echo "{READY_MARK} mac=$(cat /sys/class/net/eth0/address) ip4=$ip4 ip6=$ip6 agent=$port"
while :; do sleep 3600; done
"""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: boot ``kernel`` with ``initrd`` (both readable by QEMU)."""

    kernel: str
    initrd: str
    kernel_version: str
    key: str


def kernel_cmdline(
    ipv4: str | None = None,
    ipv6: str | None = None,
    gateway4: str | None = None,
    gateway6: str | None = None,
) -> str:
    """The kernel command line /init reads its network settings from.

    Addresses carry their prefix length (``198.19.100.50/24``); a bare
    address gets /24 or /64. ``panic=-1`` turns a guest panic into a reboot,
    which the domain maps to "destroy", so a broken guest fails fast.
    """
    words = ["console=ttyS0", "quiet", "panic=-1"]
    for key, value, default_len in (("vmm_ip4", ipv4, 24), ("vmm_ip6", ipv6, 64)):
        if value:
            iface = ipaddress.ip_interface(value if "/" in value else f"{value}/{default_len}")
            words.append(f"{key}={iface.with_prefixlen}")
    for key, gw in (("vmm_gw4", gateway4), ("vmm_gw6", gateway6)):
        if gw:
            words.append(f"{key}={ipaddress.ip_address(gw)}")
    return " ".join(words)


def default_kernel_version() -> str:
    """The newest kernel that has both /boot/vmlinuz-<v> and /lib/modules/<v>."""
    found = []
    for name in os.listdir("/boot"):
        if name.startswith("vmlinuz-"):
            version = name[len("vmlinuz-") :]
            if os.path.isdir(f"/lib/modules/{version}"):
                found.append(version)
    if not found:
        raise LibvirtLabError(
            "no kernel for the lab guest: need /boot/vmlinuz-<v> and /lib/modules/<v>",
            hint="apt-get install linux-image-amd64",
        )
    return sorted(found, key=_version_key)[-1]


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def build_guest(cache_dir: str = DEFAULT_CACHE, kernel_version: str | None = None) -> GuestImage:
    """The guest image for these inputs, built into ``cache_dir`` unless already there."""
    kver = kernel_version or default_kernel_version()
    kernel = f"/boot/vmlinuz-{kver}"
    if not os.path.isfile(kernel):
        raise LibvirtLabError(f"guest kernel {kernel} does not exist")
    files = _guest_files(kver)
    key = _cache_key(kver, files)
    out_dir = os.path.join(cache_dir, f"guest-{key[:16]}")
    initrd = os.path.join(out_dir, "initrd.cpio")
    if not os.path.isfile(initrd):
        os.makedirs(out_dir, exist_ok=True)
        tmp = f"{initrd}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(_cpio(files))
        os.replace(tmp, initrd)  # atomic: a concurrent build writes the same bytes
        with open(os.path.join(out_dir, "inputs.json"), "w", encoding="utf-8") as fh:
            json.dump({"format": FORMAT, "kernel": kernel, "files": sorted(files)}, fh, indent=1)
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=kver, key=key)


# -- the initramfs ------------------------------------------------------------

# Archive path -> host path whose bytes go there; None for the /init text.
_Files = dict[str, str | None]


def _guest_files(kver: str) -> _Files:
    for tool in (BUSYBOX, QEMU_GA):
        if not os.path.isfile(tool):
            raise LibvirtLabError(
                f"{tool} is missing", hint="apt-get install busybox-static qemu-guest-agent"
            )
    files: _Files = {"init": None, "bin/busybox": BUSYBOX, "usr/sbin/qemu-ga": QEMU_GA}
    for module in MODULES:
        files[f"lib/modules/guest/{module}.ko"] = _find_module(kver, module)
    for lib in _shared_libraries(QEMU_GA):
        files[lib.lstrip("/")] = lib
    return files


def _find_module(kver: str, name: str) -> str:
    root = f"/lib/modules/{kver}/kernel"
    for dirpath, _, names in os.walk(root):
        if f"{name}.ko" in names:
            return os.path.join(dirpath, f"{name}.ko")
    raise LibvirtLabError(
        f"kernel module {name}.ko not found under {root}",
        hint="the guest needs uncompressed virtio modules of its kernel",
    )


def _shared_libraries(binary: str) -> list[str]:
    """Every library ``ldd`` resolves for ``binary``, including the loader."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise LibvirtLabError(f"ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        found = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if found:
            libs.append(found.group(1))
        elif "=>" in line and "not found" in line:
            raise LibvirtLabError(f"{binary} needs a missing library: {line.strip()}")
    return libs


def _cache_key(kver: str, files: _Files) -> str:
    digest = hashlib.sha256(f"{FORMAT}\0{kver}\0{INIT}\0".encode())
    for name in sorted(files):
        source = files[name]
        digest.update(f"{name}\0".encode())
        if source is not None:
            with open(source, "rb") as fh:
                digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()


def _cpio(files: _Files) -> bytes:
    """An uncompressed newc archive (the kernel unpacks it; no gzip under TCG)."""
    out = io.BytesIO()
    dirs = {"dev", "proc", "sys", "run", "tmp", "bin", "lib", "var"}
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    ino = 1
    for d in sorted(dirs):
        _cpio_entry(out, ino, d, stat.S_IFDIR | 0o755, b"")
        ino += 1
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    _cpio_entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, b"", rdev=(5, 1))
    ino += 1
    _cpio_entry(out, ino, "bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    ino += 1
    for name in sorted(files):
        source = files[name]
        if source is None:
            data, mode = INIT.encode(), 0o755
        else:
            with open(source, "rb") as fh:
                data = fh.read()
            mode = 0o755 if os.stat(source).st_mode & 0o111 else 0o644
        _cpio_entry(out, ino, name, stat.S_IFREG | mode, data)
        ino += 1
    _cpio_entry(out, 0, "TRAILER!!!", 0, b"")
    return out.getvalue()


def _cpio_entry(
    out: io.BytesIO, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)
) -> None:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
    out.write(b"070701" + "".join(f"{f:08x}" for f in fields).encode() + raw)
    out.write(b"\0" * (-(110 + len(raw)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


# -- probes answered by the guest kernel -------------------------------------

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
_ICMP = struct.Struct("!BBHHH")  # type, code, checksum, id, seq
# How long the receiver keeps listening after the last request.
ECHO_LINGER_S = 0.5


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _never() -> bool:
    return False


def echo_probes(
    netns: str | None,
    dst: str,
    rate: float,
    duration: float,
    stream: str,
    *,
    start_at_ns: int | None = None,
    should_stop: Callable[[], bool] = _never,
    on_ready: Callable[[], None] | None = None,
) -> tuple[probe.SendLog, probe.RecvLog]:
    """Probe ``dst`` from ``netns`` with ICMP echo requests carrying probe packets.

    Request k (seq k) is due at ``start + k / rate``, ``start`` being
    ``start_at_ns`` (CLOCK_MONOTONIC) if given and not past; a late request
    goes out at once, keeping seq contiguous. The receiver stamps each reply
    on arrival and keeps listening ``ECHO_LINGER_S`` after the last request.
    Returns what ``probe.analyze`` takes: the send log and the replies.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    v6 = ipaddress.ip_address(dst).version == 6
    probe.encode(stream, 0, 0)  # validates the name before anything is sent
    log = probe.SendLog(stream=stream, send_ns=[], dst=dst, rate=rate, duration=duration)
    received = probe.RecvLog(bind=dst, port=0, records=[])
    ident = random.randrange(1, 0xFFFF)
    sock = socket_in(
        netns,
        socket.AF_INET6 if v6 else socket.AF_INET,
        socket.SOCK_RAW,
        socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP,
    )
    done = threading.Event()
    receiver = threading.Thread(
        target=_receive_echoes, args=(sock, v6, ident, received.records, done), daemon=True
    )
    try:
        sock.setsockopt(socket.SOL_SOCKET, probe.SO_RCVBUFFORCE, probe.RCVBUF_BYTES)
        sock.settimeout(0.05)
        receiver.start()
        if on_ready is not None:
            on_ready()
        _send_echoes(sock, v6, ident, log, start_at_ns, should_stop)
        time.sleep(ECHO_LINGER_S)
    finally:
        done.set()
        if receiver.is_alive():
            receiver.join(timeout=2)
        sock.close()
    return log, received


def _send_echoes(
    sock: socket.socket,
    v6: bool,
    ident: int,
    log: probe.SendLog,
    start_at_ns: int | None,
    should_stop: Callable[[], bool],
) -> None:
    """Send the stream on its absolute schedule; every request is logged, sent or not."""
    assert log.duration is not None
    kind = ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    now = probe.now_ns()
    start = start_at_ns if start_at_ns is not None and start_at_ns > now else now
    period = 1e9 / log.rate
    end = start + int(log.duration * 1e9)
    seq = 0
    while not should_stop():
        due = start + int(seq * period)
        if due >= end:
            break
        wait = due - probe.now_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        t = probe.now_ns()
        payload = probe.encode(log.stream, seq, t)
        checksum = 0
        if not v6:  # the kernel fills in the ICMPv6 checksum, not the ICMP one
            checksum = _checksum(_ICMP.pack(kind, 0, 0, ident, seq & 0xFFFF) + payload)
        try:
            sock.sendto(_ICMP.pack(kind, 0, checksum, ident, seq & 0xFFFF) + payload, (log.dst, 0))
        except OSError as exc:  # e.g. no route while the link is down: a loss
            log.errors.append((seq, exc.errno or 0))
        log.send_ns.append(t)
        seq += 1
    log.stopped_by_signal = should_stop()


def _receive_echoes(
    sock: socket.socket, v6: bool, ident: int, records: list[probe.Recv], done: threading.Event
) -> None:
    reply = ICMPV6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY
    while not done.is_set():
        try:
            data = sock.recv(2048)
        except TimeoutError:
            continue
        except OSError:
            return
        t = probe.now_ns()
        if not v6:
            data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets return the IP header
        if len(data) < _ICMP.size:
            continue
        kind, _, _, got_ident, _ = _ICMP.unpack_from(data)
        if kind != reply or got_ident != ident:
            continue
        decoded = probe.decode(data[_ICMP.size :])
        if decoded is not None:
            records.append(probe.Recv(decoded[0], decoded[1], decoded[2], t))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vmm_lab.libvirt.guest echo ...``: one echo stream, logs as probe.py writes."""
    parser = argparse.ArgumentParser(prog="python -m vmm_lab.libvirt.guest")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("echo", help="probe the guest with ICMP echo (run in a peer namespace)")
    e.add_argument("--dst", required=True)
    e.add_argument("--rate", type=float, default=1000.0)
    e.add_argument("--duration", type=float, required=True)
    e.add_argument("--stream", required=True)
    e.add_argument("--send-out", required=True, help="vmm-probe-send/1 log")
    e.add_argument("--recv-out", required=True, help="vmm-probe-recv/1 log")
    e.add_argument("--start-at", type=float, help="CLOCK_MONOTONIC seconds to start at")
    b = sub.add_parser("build", help="build (or find) the cached guest image")
    b.add_argument("--cache-dir", default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    if args.command == "build":
        print(json.dumps(dataclasses.asdict(build_guest(args.cache_dir))))
        return 0
    sent, received = echo_probes(
        None,
        args.dst,
        args.rate,
        args.duration,
        args.stream,
        start_at_ns=None if args.start_at is None else int(args.start_at * 1e9),
        on_ready=lambda: print("ready", flush=True),
    )
    probe.write_send_log(sent, args.send_out)
    probe.write_recv_log(received, args.recv_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
