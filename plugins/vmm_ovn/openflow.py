"""Inject frames into OVS as if the VM had sent them: OpenFlow packet-out.

On OVS a frame written to the VM's tap from the host goes *to* the VM, and
one sent with ``in_port=LOCAL`` is dropped by OVN's flows. A packet-out
with ``in_port`` = the VM's ofport and the action ``resubmit(,0)`` runs the
frame through the whole pipeline exactly as if it came from the VM
(port security, activation flows, tunnels), which is what
``ovn-controller inject-pkt`` does internally too (measured in
../shared/OVN-LAB.md).

:func:`packet_out` speaks OpenFlow 1.0 (the version every OVS bridge allows
by default) straight to the bridge's management socket: HELLO, the
packet-outs, a BARRIER so the call returns once OVS has processed every
frame; about a millisecond, no process to start. :func:`packet_out_cli`
does the same with ``ovs-ofctl`` (one process per round) and is the
fallback when the socket refuses OpenFlow 1.0.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Sequence

from vmm_orchestrator.errors import TransientError

OFP10 = 0x01
OFPT_HELLO = 0
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
OFPT_PACKET_OUT = 13
OFPT_BARRIER_REQUEST = 18
OFPT_BARRIER_REPLY = 19
OFPP_IN_PORT = 0xFFF8
NO_BUFFER = 0xFFFFFFFF
NX_VENDOR_ID = 0x00002320
NXAST_RESUBMIT_TABLE = 14
NXAST_CT = 35
NX_CT_F_COMMIT = 1
NX_CT_RECIRC_NONE = 0xFF

_HEADER = struct.Struct("!BBHI")


class OpenFlowError(TransientError):
    """The switch refused or did not answer a packet-out."""


def resubmit_table0() -> bytes:
    """Nicira ``resubmit(,0)``: run the frame through table 0 with its in_port."""
    return struct.pack("!HHIHHB3x", 0xFFFF, 16, NX_VENDOR_ID, NXAST_RESUBMIT_TABLE, OFPP_IN_PORT, 0)


def ct_commit(zone: int) -> bytes:
    """Nicira ``ct(commit,zone=Z)``: commit the frame to conntrack zone Z, nothing else."""
    if not 0 <= zone <= 0xFFFF:
        raise OpenFlowError(f"conntrack zone {zone} out of range")
    return struct.pack(
        "!HHIHHIHB3xH", 0xFFFF, 24, NX_VENDOR_ID, NXAST_CT, NX_CT_F_COMMIT, 0, zone,
        NX_CT_RECIRC_NONE, 0,
    )  # fmt: skip


def packet_out_message(xid: int, in_port: int, frame: bytes, actions: bytes | None = None) -> bytes:
    """An OpenFlow 1.0 PACKET_OUT of ``frame`` from ``in_port`` (default action:
    resubmit(,0), i.e. OVN's pipeline as if the port had sent it)."""
    actions = resubmit_table0() if actions is None else actions
    body = struct.pack("!IHH", NO_BUFFER, in_port, len(actions)) + actions + frame
    return _HEADER.pack(OFP10, OFPT_PACKET_OUT, _HEADER.size + len(body), xid) + body


def _unix_path(target: str) -> str:
    if not target.startswith("unix:"):
        raise OpenFlowError(f"OpenFlow target {target!r} is not unix:PATH")
    return target[len("unix:") :]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OpenFlowError("the switch closed the OpenFlow connection")
        buf += chunk
    return buf


def packet_out(
    target: str,
    in_port: int,
    frames: Sequence[bytes],
    timeout: float = 2.0,
    actions: bytes | None = None,
) -> None:
    """Inject ``frames`` from ``in_port`` on the bridge at ``target`` (unix:PATH.mgmt),
    through ``actions`` (encoded; default resubmit(,0)).

    Returns once OVS answered the barrier that follows them (every frame
    processed); raises OpenFlowError otherwise.
    """
    if not 0 < in_port < 0xFF00:
        raise OpenFlowError(f"ofport {in_port} cannot be a packet-out in_port")
    path = _unix_path(target)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise OpenFlowError(f"cannot connect to {target}: {exc}") from None
        out = bytearray(_HEADER.pack(OFP10, OFPT_HELLO, _HEADER.size, 1))
        for i, frame in enumerate(frames):
            out += packet_out_message(100 + i, in_port, frame, actions)
        barrier_xid = 99
        out += _HEADER.pack(OFP10, OFPT_BARRIER_REQUEST, _HEADER.size, barrier_xid)
        sock.sendall(out)
        while True:
            version, typ, length, xid = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
            body = _recv_exact(sock, length - _HEADER.size)
            if typ == OFPT_ERROR:
                etype, code = struct.unpack_from("!HH", body)
                raise OpenFlowError(
                    f"switch at {target} answered OpenFlow error type {etype} code {code} "
                    f"(version {version}, xid {xid})"
                )
            if typ == OFPT_ECHO_REQUEST:
                sock.sendall(_HEADER.pack(OFP10, OFPT_ECHO_REPLY, length, xid) + body)
            elif typ == OFPT_BARRIER_REPLY and xid == barrier_xid:
                return


def packet_out_cli(
    target: str, in_port: int, frames: Sequence[bytes], timeout: float = 5.0
) -> None:
    """The same through ``ovs-ofctl packet-out SWITCH IN_PORT ACTIONS PACKET...``."""
    args = ["ovs-ofctl", f"--timeout={max(1, int(timeout))}", "packet-out", target, str(in_port)]
    args += ["resubmit(,0)", *(f.hex() for f in frames)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 1)
    if proc.returncode != 0:
        raise OpenFlowError(f"ovs-ofctl packet-out on {target} failed: {proc.stderr.strip()}")


def default_target(ovsdb_connection: str, bridge: str) -> str:
    """``unix:<folder of the OVSDB socket>/<bridge>.mgmt`` (where ovs-vswitchd puts it)."""
    if ovsdb_connection.startswith("unix:"):
        folder = os.path.dirname(ovsdb_connection[len("unix:") :])
    else:
        folder = "/var/run/openvswitch"
    return f"unix:{folder}/{bridge}.mgmt"
