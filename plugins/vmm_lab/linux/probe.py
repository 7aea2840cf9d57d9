"""Sequence-numbered UDP probe streams and their loss analysis.

The lab measures how well the network follows a live-migrating VM: peers send
probe streams to the VM while it is paused and moved, and afterwards we count
what was lost while it was paused, what was lost after it resumed, duplicates,
reordering and how long the path stayed black-holed after resume.

Run as a program inside a network namespace::

    python -m vmm_lab.linux.probe recv --bind 10.0.0.2 --port 9000 --out r.json
    python -m vmm_lab.linux.probe send --dst 10.0.0.2 --port 9000 --rate 1000 \
        --duration 5 --stream v4 --out s.json [--start-at MONO_SECONDS]

Both print a single ``ready`` line (flushed) once their socket exists, stop
gracefully on SIGTERM/SIGINT and write their JSON log at exit.

All timestamps are CLOCK_MONOTONIC nanoseconds. That clock is system-wide (not
per network namespace), so send times written by a sender in one namespace,
receive times written by a receiver in another and the pause window measured
by the lab in the parent can be compared directly. (Processes in a separate
*time* namespace would break this; the lab does not use them.)

Wire format (network byte order), followed by the UTF-8 stream name::

    magic  b"VMMP"   4 bytes
    version          uint8   (1)
    name_len         uint8   length of the name that follows the header
    reserved         uint16  (0)
    stream_id        uint32  crc32 of the stream name
    seq              uint64  0, 1, 2, ... per stream
    send_ns          uint64  CLOCK_MONOTONIC ns taken just before sendto()

The name travels in every packet so that one receiver can tell several
streams apart without being told their names in advance.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import math
import os
import signal
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, NamedTuple

MAGIC = b"VMMP"
VERSION = 1
HEADER = struct.Struct("!4sBBHIQQ")
MAX_NAME_BYTES = 255
SEND_FORMAT = "vmm-probe-send/1"
RECV_FORMAT = "vmm-probe-recv/1"

# When the sender falls behind its schedule (a loaded machine, a stalled
# process) it sends the overdue packets back to back so the sequence keeps its
# rate. After a stall longer than this, catching up would blast a burst that
# itself causes loss, so the schedule is re-anchored at "now" instead.
MAX_CATCHUP_NS = 100_000_000
# Longest single sleep while waiting for --start-at, so a SIGTERM is noticed.
_WAIT_SLICE_S = 0.05
# Receive timeout: how often the receiver checks its stop flag and duration.
_RECV_POLL_S = 0.1
# Large enough for a few seconds of several 1000 pps streams if the receiver
# is descheduled; SO_RCVBUFFORCE (root) ignores net.core.rmem_max.
RCVBUF_BYTES = 8 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux value; Python lacks the name


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: the one clock every namespace on the host shares."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def stream_id(name: str) -> int:
    """The 32-bit id carried in each packet (crc32 of the stream name)."""
    return zlib.crc32(name.encode()) & 0xFFFFFFFF


# --------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------


@dataclasses.dataclass
class SendLog:
    """What one sender sent: ``send_ns[i]`` is the send time of seq ``first_seq + i``.

    Sequence numbers are contiguous, so only the times are stored; a packet
    whose sendto() failed is still in the log (its number was used and it
    never arrived, which is a loss) and is also listed in ``errors``.
    """

    stream: str
    send_ns: list[int]
    first_seq: int = 0
    dst: str = ""
    port: int = 0
    rate: float = 0.0
    duration: float | None = None
    errors: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    late: int = 0
    max_lag_ns: int = 0
    reanchored: int = 0
    stopped_by_signal: bool = False

    @property
    def sent(self) -> int:
        """Number of packets sent (sendto attempted)."""
        return len(self.send_ns)

    @property
    def first_send_ns(self) -> int | None:
        """Send time of the first packet, None if nothing was sent."""
        return self.send_ns[0] if self.send_ns else None

    @property
    def last_send_ns(self) -> int | None:
        """Send time of the last packet, None if nothing was sent."""
        return self.send_ns[-1] if self.send_ns else None


class Recv(NamedTuple):
    """One received packet: ``(stream, seq, send_ns, recv_ns)``."""

    stream: str
    seq: int
    send_ns: int
    recv_ns: int


@dataclasses.dataclass
class RecvLog:
    """Everything one receiver got, in arrival order."""

    bind: str
    port: int
    records: list[Recv]
    malformed: int = 0
    sources: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    stopped_by_signal: bool = False


@dataclasses.dataclass
class StreamReport:
    """Per-stream outcome of a migration run.

    ``received`` counts distinct sequence numbers from the send log that
    arrived, so ``sent == received + lost`` and
    ``lost == lost_before_pause + lost_while_paused + lost_after_resume``.
    Extra copies are ``duplicates``; packets whose seq is not in the send log
    (another run, another sender using the same name) are ``unexpected``.
    ``reordered`` counts first copies that arrived after a higher seq had.
    """

    stream: str
    sent: int
    received: int
    lost: int
    lost_before_pause: int
    lost_while_paused: int
    lost_after_resume: int
    duplicates: int
    reordered: int
    unexpected: int
    black_hole_ms: float
    converged: bool
    last_loss_ms: float | None
    # Latency figures (not part of equality: derived from the times, not the counts).
    #: Packets sent while paused that arrived (held somewhere, then delivered).
    held: int = dataclasses.field(default=0, compare=False)
    #: Median one-way latency of the packets sent before the pause (the path's own).
    base_latency_ms: float | None = dataclasses.field(default=None, compare=False)
    #: Latency added to the held packets, over base_latency_ms: the largest and the median.
    held_extra_ms_max: float | None = dataclasses.field(default=None, compare=False)
    held_extra_ms_median: float | None = dataclasses.field(default=None, compare=False)


# Columns of StreamReport for format_table, in a sensible reading order.
REPORT_COLUMNS: list[tuple[str, str]] = [
    ("stream", "stream"),
    ("sent", "sent"),
    ("received", "recv"),
    ("lost_before_pause", "lost<pause"),
    ("lost_while_paused", "lost@pause"),
    ("lost_after_resume", "lost>resume"),
    ("duplicates", "dup"),
    ("reordered", "reord"),
    ("black_hole_ms", "blackhole ms"),
    ("converged", "converged"),
    ("last_loss_ms", "last loss ms"),
]


# --------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------


def _ms(delta_ns: int) -> float:
    return delta_ns / 1_000_000


def _first_copies(sent: SendLog, received: Sequence[Recv]) -> tuple[list[int], int, int, int]:
    """Seqs received (first copies, arrival order), duplicates, reordered, unexpected."""
    lo, hi = sent.first_seq, sent.first_seq + sent.sent
    mine = sorted((r for r in received if r.stream == sent.stream), key=lambda r: r.recv_ns)
    seen: set[int] = set()
    order: list[int] = []
    duplicates = reordered = unexpected = 0
    highest = -1
    for r in mine:
        if not lo <= r.seq < hi:
            unexpected += 1
            continue
        if r.seq in seen:
            duplicates += 1
            continue
        seen.add(r.seq)
        order.append(r.seq)
        if r.seq < highest:
            reordered += 1
        else:
            highest = r.seq
    return order, duplicates, reordered, unexpected


def lost_seqs(sent: SendLog, received: Sequence[Recv]) -> list[int]:
    """Sequence numbers of ``sent`` that never arrived, ascending."""
    got = set(_first_copies(sent, received)[0])
    return [sent.first_seq + i for i in range(sent.sent) if sent.first_seq + i not in got]


def analyze(
    sent: SendLog, received: Sequence[Recv], pause_start_ns: int, pause_end_ns: int
) -> StreamReport:
    """Classify one stream's packets against the pause window [start, end).

    ``received`` may hold packets of other streams (a whole receiver log);
    only those named ``sent.stream`` are used. Arrival order is taken from
    ``recv_ns``.

    ``black_hole_ms`` is how long after resume the path was still broken:
    0 if the first packet sent at/after ``pause_end_ns`` arrived, otherwise
    the send time of the first post-resume packet that did arrive minus
    ``pause_end_ns``. If no post-resume packet arrived the path never came
    back while we measured: ``converged`` is False and ``black_hole_ms`` is
    the time from ``pause_end_ns`` to the last send (0 when nothing was sent
    after resume, since there is then no evidence either way).
    """
    if pause_end_ns < pause_start_ns:
        raise ValueError(f"pause ends ({pause_end_ns}) before it starts ({pause_start_ns})")
    order, duplicates, reordered, unexpected = _first_copies(sent, received)
    got = set(order)

    before = during = after = 0
    last_lost_after: int | None = None
    first_post: tuple[int, int] | None = None  # (send_ns, seq) of the first post-resume send
    first_post_received: int | None = None  # send_ns of the first post-resume arrival
    for i, t in enumerate(sent.send_ns):
        seq = sent.first_seq + i
        arrived = seq in got
        if t >= pause_end_ns:
            if first_post is None or (t, seq) < first_post:
                first_post = (t, seq)
            if arrived:
                if first_post_received is None or t < first_post_received:
                    first_post_received = t
            else:
                after += 1
                if last_lost_after is None or t > last_lost_after:
                    last_lost_after = t
        elif not arrived:
            if t >= pause_start_ns:
                during += 1
            else:
                before += 1

    if first_post is None:
        black_hole_ms, converged = 0.0, False
    elif first_post[1] in got:
        black_hole_ms, converged = 0.0, True
    elif first_post_received is not None:
        black_hole_ms, converged = _ms(first_post_received - pause_end_ns), True
    else:
        last = max(sent.send_ns)
        black_hole_ms, converged = _ms(max(0, last - pause_end_ns)), False

    held, base, extra_max, extra_median = _latencies(sent, received, pause_start_ns, pause_end_ns)
    return StreamReport(
        held=held,
        base_latency_ms=base,
        held_extra_ms_max=extra_max,
        held_extra_ms_median=extra_median,
        stream=sent.stream,
        sent=sent.sent,
        received=len(got),
        lost=before + during + after,
        lost_before_pause=before,
        lost_while_paused=during,
        lost_after_resume=after,
        duplicates=duplicates,
        reordered=reordered,
        unexpected=unexpected,
        black_hole_ms=black_hole_ms,
        converged=converged,
        last_loss_ms=None if last_lost_after is None else _ms(last_lost_after - pause_end_ns),
    )


def _latencies(
    sent: SendLog, received: Sequence[Recv], pause_start_ns: int, pause_end_ns: int
) -> tuple[int, float | None, float | None, float | None]:
    """(held, base ms, extra ms max, extra ms median): first copies only.

    The base is the median latency of packets sent before the pause; a held
    packet's extra latency is its latency minus that base.
    """
    first: dict[int, Recv] = {}
    for r in sorted((r for r in received if r.stream == sent.stream), key=lambda r: r.recv_ns):
        first.setdefault(r.seq, r)
    before = sorted(r.recv_ns - r.send_ns for r in first.values() if r.send_ns < pause_start_ns)
    held = [
        r.recv_ns - r.send_ns for r in first.values() if pause_start_ns <= r.send_ns < pause_end_ns
    ]
    base = before[len(before) // 2] if before else 0
    if not held:
        return 0, _ms(base) if before else None, None, None
    extra = sorted(max(0, lat - base) for lat in held)
    return len(held), _ms(base) if before else None, _ms(extra[-1]), _ms(extra[len(extra) // 2])


# --------------------------------------------------------------------------
# Log files
# --------------------------------------------------------------------------


def _write_json(path: str, doc: Mapping[str, Any]) -> None:
    """Write atomically so a reader never sees half a log from a killed writer."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str, fmt: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} log")
    return doc


def write_send_log(log: SendLog, path: str) -> None:
    """Write a send log (format ``vmm-probe-send/1``, see ``load_send_log``)."""
    _write_json(
        path,
        {
            "format": SEND_FORMAT,
            "stream": log.stream,
            "stream_id": stream_id(log.stream),
            "dst": log.dst,
            "port": log.port,
            "rate": log.rate,
            "duration": log.duration,
            "sent": log.sent,
            "first_seq": log.first_seq,
            "first_send_ns": log.first_send_ns,
            "last_send_ns": log.last_send_ns,
            "send_ns": log.send_ns,
            "errors": [list(e) for e in log.errors],
            "late": log.late,
            "max_lag_ns": log.max_lag_ns,
            "reanchored": log.reanchored,
            "stopped_by_signal": log.stopped_by_signal,
        },
    )


def load_send_log(path: str) -> SendLog:
    """Read a sender's JSON log.

    ``send_ns`` is a JSON array of ints; element i is the send time of seq
    ``first_seq + i`` (30 s at 1000 pps is ~0.5 MB).
    """
    doc = _read_json(path, SEND_FORMAT)
    send_ns = [int(t) for t in doc["send_ns"]]
    if len(send_ns) != int(doc["sent"]):
        raise ValueError(f"{path}: sent={doc['sent']} but {len(send_ns)} send times")
    return SendLog(
        stream=str(doc["stream"]),
        send_ns=send_ns,
        first_seq=int(doc.get("first_seq", 0)),
        dst=str(doc.get("dst", "")),
        port=int(doc.get("port", 0)),
        rate=float(doc.get("rate", 0.0)),
        duration=None if doc.get("duration") is None else float(doc["duration"]),
        errors=[(int(s), int(e)) for s, e in doc.get("errors", [])],
        late=int(doc.get("late", 0)),
        max_lag_ns=int(doc.get("max_lag_ns", 0)),
        reanchored=int(doc.get("reanchored", 0)),
        stopped_by_signal=bool(doc.get("stopped_by_signal", False)),
    )


def write_recv_log(log: RecvLog, path: str) -> None:
    """Write a receive log (format ``vmm-probe-recv/1``, see ``load_recv_log``).

    Column-oriented per stream so 30 s x several streams stays a few MB and
    names are not repeated per packet.
    """
    streams: dict[str, dict[str, Any]] = {}
    for r in log.records:
        s = streams.get(r.stream)
        if s is None:
            s = streams[r.stream] = {
                "stream_id": stream_id(r.stream),
                "sources": log.sources.get(r.stream, []),
                "seq": [],
                "send_ns": [],
                "recv_ns": [],
            }
        s["seq"].append(r.seq)
        s["send_ns"].append(r.send_ns)
        s["recv_ns"].append(r.recv_ns)
    _write_json(
        path,
        {
            "format": RECV_FORMAT,
            "bind": log.bind,
            "port": log.port,
            "received": len(log.records),
            "malformed": log.malformed,
            "first_recv_ns": log.records[0].recv_ns if log.records else None,
            "last_recv_ns": log.records[-1].recv_ns if log.records else None,
            "stopped_by_signal": log.stopped_by_signal,
            "streams": streams,
        },
    )


def load_recv_log(path: str) -> list[Recv]:
    """Read a receiver's JSON log: every packet of every stream, in arrival order.

    File layout: ``streams`` maps a stream name to parallel arrays ``seq``,
    ``send_ns`` and ``recv_ns`` (arrival order within the stream).
    """
    doc = _read_json(path, RECV_FORMAT)
    out: list[Recv] = []
    for name, s in doc["streams"].items():
        seqs, sends, recvs = s["seq"], s["send_ns"], s["recv_ns"]
        if not len(seqs) == len(sends) == len(recvs):
            raise ValueError(f"{path}: stream {name!r} has arrays of different lengths")
        rows = zip(seqs, sends, recvs, strict=True)
        out.extend(Recv(str(name), int(a), int(b), int(c)) for a, b, c in rows)
    out.sort(key=lambda r: r.recv_ns)  # stable: keeps per-stream order on equal times
    return out


# --------------------------------------------------------------------------
# Sending and receiving
# --------------------------------------------------------------------------


def encode(name: str, seq: int, send_ns: int) -> bytes:
    """One probe packet (see the module docstring for the layout)."""
    raw = name.encode()
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"stream name longer than {MAX_NAME_BYTES} bytes")
    return HEADER.pack(MAGIC, VERSION, len(raw), 0, stream_id(name), seq, send_ns) + raw


def decode(data: bytes) -> tuple[str, int, int] | None:
    """``(stream, seq, send_ns)`` of a probe packet, None if it is not one."""
    if len(data) < HEADER.size:
        return None
    magic, version, name_len, _, sid, seq, sent = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) < HEADER.size + name_len:
        return None
    try:
        name = data[HEADER.size : HEADER.size + name_len].decode()
    except UnicodeDecodeError:
        return None
    return (name or f"#{sid:08x}"), seq, sent


def _numeric_addr(host: str, port: int, passive: bool = False) -> tuple[int, Any]:
    """(family, sockaddr) of a literal IPv4/IPv6 address (``fe80::1%dev`` allowed)."""
    flags = socket.AI_NUMERICHOST | (socket.AI_PASSIVE if passive else 0)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, flags)[0]
    return family, sockaddr


def _never() -> bool:
    return False


def send_probes(
    dst: str,
    port: int,
    rate: float,
    duration: float | None,
    stream: str,
    *,
    start_at_ns: int | None = None,
    should_stop: Callable[[], bool] = _never,
    on_ready: Callable[[], None] | None = None,
) -> SendLog:
    """Send seq 0, 1, 2, ... at ``rate`` pps to dst:port and return what was sent.

    Packet k is due at ``start + k / rate`` (absolute deadlines, so the rate
    does not drift with per-packet overhead). The sender sleeps until each
    deadline instead of spinning, which matters on a small loaded machine
    running several senders; a late packet goes out at once with the next
    sequence number (no seq is ever skipped). After a stall longer than
    ``MAX_CATCHUP_NS`` the schedule restarts at "now" (counted in
    ``reanchored``) rather than bursting. ``duration`` None: until stopped.
    ``start`` is ``start_at_ns`` (CLOCK_MONOTONIC) when given and not already
    past, else now. The stream ends at ``start + duration`` or when
    ``should_stop()`` is true; ``on_ready()`` is called once the socket exists.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    family, sockaddr = _numeric_addr(dst, port)
    encode(stream, 0, 0)  # validates the name before anything is sent
    raw_name = stream.encode()
    sid = stream_id(stream)
    period = 1e9 / rate
    log = SendLog(stream=stream, send_ns=[], dst=dst, port=port, rate=rate, duration=duration)
    times = array.array("q")
    buf = bytearray(HEADER.size + len(raw_name))
    buf[HEADER.size :] = raw_name
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if on_ready is not None:
            on_ready()
        if start_at_ns is not None:
            while not should_stop() and (left := start_at_ns - now_ns()) > 0:
                time.sleep(min(left / 1e9, _WAIT_SLICE_S))
        anchor = now_ns()
        if start_at_ns is not None and 0 <= anchor - start_at_ns <= period:
            # Woke on time: start exactly at start_at so senders started
            # together share their phase and end time.
            anchor = start_at_ns
        end = None if duration is None else anchor + int(duration * 1e9)
        k = 0
        seq = 0
        while not should_stop():
            deadline = anchor + int(k * period)
            if end is not None and deadline >= end:
                break
            now = now_ns()
            if now < deadline:
                time.sleep((deadline - now) / 1e9)
                continue  # re-check the stop flag and the clock after waking
            lag = now - deadline
            if lag > MAX_CATCHUP_NS:
                if end is not None and now >= end:
                    break  # stalled past the end: the rest is not worth sending
                anchor, k, lag = now, 0, 0
                log.reanchored += 1
            if lag > period:
                log.late += 1
            log.max_lag_ns = max(log.max_lag_ns, lag)
            t = now_ns()
            HEADER.pack_into(buf, 0, MAGIC, VERSION, len(raw_name), 0, sid, seq, t)
            try:
                sock.sendto(buf, sockaddr)
            except OSError as e:  # e.g. ENETUNREACH while the link is down: a loss
                log.errors.append((seq, e.errno or 0))
            times.append(t)
            seq += 1
            k += 1
        log.stopped_by_signal = should_stop()
    log.send_ns = times.tolist()
    return log


def _open_receiver(bind: str, port: int) -> tuple[socket.socket, int]:
    family, sockaddr = _numeric_addr(bind, port, passive=True)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and bind in ("::", "::0"):
            # The wildcard takes IPv4 too (as mapped addresses): one receiver
            # can then serve a peer's IPv4 and IPv6 streams.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:  # not root: capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.bind(sockaddr)
        bound_port: int = sock.getsockname()[1]
        sock.settimeout(_RECV_POLL_S)
    except BaseException:
        sock.close()
        raise
    return sock, bound_port


def receive_probes(
    bind: str,
    port: int,
    *,
    duration: float | None = None,
    should_stop: Callable[[], bool] = _never,
    on_ready: Callable[[int], None] | None = None,
) -> RecvLog:
    """Receive probe packets on bind:port until stopped or ``duration`` elapses.

    ``on_ready(port)`` is called once bound (with the real port, so port 0
    works in tests). Each packet's arrival time is read right after recvfrom
    returns; the large SO_RCVBUF keeps a briefly descheduled receiver from
    dropping packets (which would look like network loss).
    """
    sock, bound_port = _open_receiver(bind, port)
    records: list[Recv] = []
    sources: dict[str, set[str]] = {}
    names: dict[tuple[int, bytes], str] = {}
    malformed = 0
    with sock:
        if on_ready is not None:
            on_ready(bound_port)
        end = None if duration is None else now_ns() + int(duration * 1e9)
        hsize = HEADER.size
        while not should_stop():
            try:
                data, addr = sock.recvfrom(2048)
            except TimeoutError:
                if end is not None and now_ns() >= end:
                    break
                continue
            t = now_ns()
            if len(data) < hsize or data[:4] != MAGIC:
                malformed += 1
                continue
            _, version, name_len, _, sid, seq, sent = HEADER.unpack_from(data)
            if version != VERSION or len(data) < hsize + name_len:
                malformed += 1
                continue
            key = (sid, data[hsize : hsize + name_len])
            name = names.get(key)
            if name is None:
                decoded = decode(data)
                if decoded is None:
                    malformed += 1
                    continue
                name = names[key] = decoded[0]
            records.append(Recv(name, seq, sent, t))
            src = sources.get(name)
            if src is None:
                src = sources[name] = set()
            src.add(addr[0])
            if end is not None and t >= end:
                break
    return RecvLog(
        bind=bind,
        port=bound_port,
        records=records,
        malformed=malformed,
        sources={k: sorted(v) for k, v in sources.items()},
        stopped_by_signal=should_stop(),
    )


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def _cell(value: Any, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec:
        return format(value, spec)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str] | tuple[str, str, str]],
) -> str:
    """A plain-text table, one line per row, for reports printed to a terminal or log.

    ``columns`` is ``(key, header)`` or ``(key, header, format_spec)``.
    Columns whose values are all numbers (or missing) are right-aligned so
    digits line up; others are left-aligned. None prints as "-", a missing
    key as "", bools as yes/no, floats with one decimal unless a format spec
    is given. No trailing whitespace, no trailing newline.
    """
    keys = [c[0] for c in columns]
    headers = [c[1] for c in columns]
    specs = [c[2] if len(c) > 2 else None for c in columns]
    numeric = []
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        numeric.append(bool(values) and all(_is_number(v) for v in values))
    cells = [
        [_cell(row[key], spec) if key in row else "" for key, spec in zip(keys, specs, strict=True)]
        for row in rows
    ]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]

    def render(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [render(headers), render(["-" * w for w in widths])]
    out.extend(render(line) for line in cells)
    return "\n".join(out)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


class _StopFlag:
    """Set by SIGTERM/SIGINT; polled by the loops (a handler that only sets a
    flag cannot deadlock or interrupt a half-written log)."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)


def _ready(*_: object) -> None:
    print("ready", flush=True)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``send`` / ``recv`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m vmm_lab.linux.probe",
        description="UDP probe streams for the lab",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send", help="send one sequence-numbered stream")
    s.add_argument("--dst", required=True, help="destination IPv4/IPv6 address")
    s.add_argument("--port", required=True, type=_port)
    s.add_argument("--rate", type=_positive, default=1000.0, help="packets per second")
    s.add_argument("--duration", type=_positive, help="seconds (default: until SIGTERM)")
    s.add_argument("--stream", required=True, help="stream name (<= 255 UTF-8 bytes)")
    s.add_argument("--out", required=True, help="JSON send log written at exit")
    s.add_argument(
        "--start-at",
        type=float,
        help="CLOCK_MONOTONIC seconds to start at, so several senders start together",
    )
    r = sub.add_parser("recv", help="receive streams and log every packet")
    r.add_argument("--bind", required=True, help="local IPv4/IPv6 address ('::' takes both)")
    r.add_argument("--port", required=True, type=_port)
    r.add_argument("--out", required=True, help="JSON receive log written at exit")
    r.add_argument("--duration", type=_positive, help="seconds (default: until SIGTERM)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vmm_lab.linux.probe``."""
    args = build_parser().parse_args(argv)
    stop = _StopFlag()
    stop.install()
    if args.command == "send":
        if len(args.stream.encode()) > MAX_NAME_BYTES:
            print(f"stream name longer than {MAX_NAME_BYTES} bytes", file=sys.stderr)
            return 2
        log = send_probes(
            args.dst,
            args.port,
            args.rate,
            args.duration,
            args.stream,
            start_at_ns=None if args.start_at is None else int(args.start_at * 1e9),
            should_stop=stop,
            on_ready=_ready,
        )
        write_send_log(log, args.out)
    else:
        recv_log = receive_probes(
            args.bind,
            args.port,
            duration=args.duration,
            should_stop=stop,
            on_ready=_ready,
        )
        write_recv_log(recv_log, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
