"""Diskless guests: a RARP request for the guest's own MAC, sent by a real
guest namespace of the lab, is answered by the NVE it is attached to with the
IPv4 address the directory binds to that MAC (issue 14 item 1,
draft-ietf-nvo3-vmm section 4.2). An unknown MAC gets no answer and is
counted; the request reaches the other NVEs too (flooded over VXLAN) and
none of them answers.
"""

from __future__ import annotations

import json
import socket
import time

from oslo_config import cfg

from vmm_lab.linux.demo import lab_site
from vmm_lab.linux.topology import in_ns
from vmm_linux import frames
from vmm_linux.netns import socket_in

VNI = 100
UNKNOWN_MAC = "02:5e:00:00:00:99"


def rarp_exchange(netns: str, mac: str, wait: float = 1.5) -> list[dict]:
    """Send one RARP request for ``mac`` from eth0 of ``netns``; the replies received."""
    sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(frames.ETH_P_RARP))
    try:
        sock.bind(("eth0", frames.ETH_P_RARP))
        sock.settimeout(0.1)
        sock.send(frames.rarp(mac))
        replies = []
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                data = sock.recv(2048)
            except TimeoutError:
                continue
            arp = frames.parse_arp(data)
            if arp["op"] == frames.ARPOP_RREPLY:
                replies.append(arp)
        return replies
    finally:
        sock.close()


def test_a_diskless_guest_gets_its_address_by_rarp_and_an_unknown_mac_none(
    lab_conf: cfg.ConfigOpts, prefix: str
) -> None:
    with lab_site(lab_conf, prefix, orchestrated=False) as site:
        vm1 = site.lab.vms["vm1"]  # on h1
        h1 = site.hosts["h1"]
        assert h1.rarp is not None, "[rarp] responder is on by default"

        replies = rarp_exchange(vm1.netns, vm1.mac)
        assert len(replies) == 1, replies  # only the guest's own NVE answers
        reply = replies[0]
        assert reply["dst"] == vm1.mac and reply["tha"] == vm1.mac
        assert reply["tpa"] == vm1.ipv4
        link = json.loads(in_ns(site.lab.hosts["h1"].netns, "ip", "-j", "link", "show", "br-100"))
        assert reply["src"] == reply["sha"] == link[0]["address"]  # from the VN bridge
        assert h1.rarp.answered == 1
        for name in ("h2", "h3"):  # the request was flooded to them; they stay silent
            responder = site.hosts[name].rarp
            assert responder is not None and responder.answered == 0, name

        assert rarp_exchange(vm1.netns, UNKNOWN_MAC) == []
        assert h1.rarp.unknown == 1
        assert h1.rarp.answered == 1


def test_the_responder_can_be_turned_off(lab_conf: cfg.ConfigOpts, prefix: str) -> None:
    from vmm_linux import rarp

    rarp.register_opts(lab_conf)
    lab_conf.set_override("responder", False, group=rarp.GROUP)
    with lab_site(lab_conf, prefix, orchestrated=False) as site:
        vm1 = site.lab.vms["vm1"]
        assert site.hosts["h1"].rarp is None
        assert rarp_exchange(vm1.netns, vm1.mac, wait=1.0) == []
