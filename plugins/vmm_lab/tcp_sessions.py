"""Many TCP sessions through the stateful firewall: a server in the VM, a client in a peer.

``python -m vmm_lab.tcp_sessions serve --bind IP --port P`` echoes every
line on every connection (selectors, one thread). ``... clients --dst IP
--port P --count N`` opens N connections, then keeps sending a short line on
each (round robin, ``--rate`` lines per second in all) and reading its echo,
until SIGTERM; it then tries every connection once more and writes a JSON
report: how many were established, how many still echo at the end, and the
longest time any connection went without an echo (the stall the migration
caused). Run inside the lab's namespaces (``ip netns exec``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

LINE = b"x" * 15 + b"\n"
#: How long the final round trip may take on every connection at once.
FINAL_WAIT_S = 5.0


def serve(bind: str, port: int) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.is_set():
        for key, _ in sel.select(timeout=0.2):
            sock = key.fileobj
            if sock is listener:
                with contextlib.suppress(BlockingIOError):
                    conn, _addr = listener.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            with contextlib.suppress(OSError):
                sock.sendall(data)
    return 0


def clients(dst: str, port: int, count: int, rate: float, out: str) -> int:
    conns: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect((dst, port))
        sock.setblocking(False)
        conns.append(sock)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"ready {len(conns)}", flush=True)
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(conns):
        sel.register(sock, selectors.EVENT_READ, i)
    now = time.monotonic()
    last_echo = [now] * count
    longest = [0.0] * count
    pending = [0] * count
    interval = 1.0 / rate if rate > 0 else 1.0
    nxt, i = now, 0
    while not stop.is_set():
        now = time.monotonic()
        if now >= nxt:
            with contextlib.suppress(OSError):
                conns[i].send(LINE)
                pending[i] += len(LINE)
            i = (i + 1) % count
            nxt += interval
        for key, _ in sel.select(timeout=max(0.0, min(0.05, nxt - time.monotonic()))):
            idx = key.data
            try:
                data = conns[idx].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                t = time.monotonic()
                longest[idx] = max(longest[idx], t - last_echo[idx])
                last_echo[idx] = t
                pending[idx] = max(0, pending[idx] - len(data))
    # one more round trip on every connection, all at once: does each still work?
    for idx, sock in enumerate(conns):
        with contextlib.suppress(OSError):
            sock.send(LINE)
            pending[idx] += len(LINE)
    deadline = time.monotonic() + FINAL_WAIT_S
    while any(pending) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            idx = key.data
            try:
                data = conns[idx].recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(conns[idx])
                continue
            pending[idx] = max(0, pending[idx] - len(data))
    alive = sum(1 for p in pending if p == 0)
    report = {
        "established": len(conns),
        "alive": alive,
        "longest_stall_ms": round(max(longest, default=0.0) * 1000.0, 1),
    }
    with open(out, "w") as fh:
        json.dump(report, fh)
    for sock in conns:
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("clients")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=1000)
    c.add_argument("--rate", type=float, default=1000.0, help="lines per second in all")
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.bind, args.port)
    return clients(args.dst, args.port, args.count, args.rate, args.out)


if __name__ == "__main__":
    sys.exit(main())
