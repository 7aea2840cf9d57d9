"""Probe-stream analysis on synthetic logs, plus log files, wire format and tables.

The lab's migration verdicts are only as good as this arithmetic, so every
field is checked with exact counts on hand-made logs where the right answer
is obvious. Nothing here needs root or namespaces; the loopback and SIGTERM
tests take a few hundred milliseconds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vmm_lab.linux import probe
from vmm_lab.linux.probe import Recv, SendLog, analyze

MS = 1_000_000
T0 = 1_000_000_000_000  # an arbitrary CLOCK_MONOTONIC origin
LATENCY = 50_000  # 50 us one-way


def send_log(n: int = 300, stream: str = "s") -> SendLog:
    """Packet i is sent at T0 + i ms (1000 pps)."""
    return SendLog(stream=stream, send_ns=[T0 + i * MS for i in range(n)])


def deliver(log: SendLog, seqs: list[int] | range) -> list[Recv]:
    """Receive records for ``seqs`` in the given order, arriving 1 us apart."""
    out = []
    for k, seq in enumerate(seqs):
        t = log.send_ns[seq - log.first_seq]
        out.append(Recv(log.stream, seq, t, T0 + LATENCY + k * 1000 + (t - T0)))
    # Arrival order is the list order: make recv_ns strictly increasing in it.
    fixed = []
    last = 0
    for r in out:
        last = max(last + 1, r.recv_ns)
        fixed.append(r._replace(recv_ns=last))
    return fixed


def except_(n: int, *lost: range | int) -> list[int]:
    gone: set[int] = set()
    for item in lost:
        gone.update(item if isinstance(item, range) else [item])
    return [i for i in range(n) if i not in gone]


# Pause window used by most tests: [100 ms, 200 ms) after T0.
P_START = T0 + 100 * MS
P_END = T0 + 200 * MS


def test_clean_run_has_no_losses_and_zero_black_hole() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, range(300)), P_START, P_END)
    assert rep == probe.StreamReport(
        stream="s",
        sent=300,
        received=300,
        lost=0,
        lost_before_pause=0,
        lost_while_paused=0,
        lost_after_resume=0,
        duplicates=0,
        reordered=0,
        unexpected=0,
        black_hole_ms=0.0,
        converged=True,
        last_loss_ms=None,
    )


def test_losses_while_paused_only() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, except_(300, range(100, 200))), P_START, P_END)
    assert (rep.sent, rep.received, rep.lost) == (300, 200, 100)
    assert rep.lost_while_paused == 100
    assert rep.lost_before_pause == 0
    assert rep.lost_after_resume == 0
    assert rep.black_hole_ms == 0.0
    assert rep.converged is True
    assert rep.last_loss_ms is None


def test_window_boundaries_start_inclusive_end_exclusive() -> None:
    log = send_log()
    # 99 is just before the pause, 100 exactly at its start, 199 the last
    # inside, 200 exactly at resume (post-resume), 201 received.
    rep = analyze(log, deliver(log, except_(300, 99, 100, 199, 200)), P_START, P_END)
    assert rep.lost_before_pause == 1
    assert rep.lost_while_paused == 2
    assert rep.lost_after_resume == 1
    assert rep.black_hole_ms == 1.0  # seq 201 sent 1 ms after resume
    assert rep.last_loss_ms == 0.0


def test_losses_after_resume_give_black_hole_and_last_loss() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, except_(300, range(100, 205))), P_START, P_END)
    assert rep.lost_while_paused == 100
    assert rep.lost_after_resume == 5
    assert rep.lost == 105
    assert rep.black_hole_ms == 5.0  # seq 205 is the first to arrive
    assert rep.last_loss_ms == 4.0  # seq 204
    assert rep.converged is True


def test_flapping_after_resume_black_hole_zero_but_late_loss_reported() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, except_(300, 230, 250, 251)), P_START, P_END)
    assert rep.lost_after_resume == 3
    assert rep.black_hole_ms == 0.0  # seq 200 arrived
    assert rep.last_loss_ms == 51.0
    assert rep.converged is True


def test_black_hole_measured_from_pause_end_not_first_post_send() -> None:
    # Resume in the middle of a send interval: the first post-resume packet
    # (seq 200, sent 0.5 ms after resume) is lost, seq 201 arrives.
    log = send_log()
    p_end = T0 + 199 * MS + MS // 2
    rep = analyze(log, deliver(log, except_(300, range(100, 201))), P_START, p_end)
    assert rep.lost_while_paused == 100  # seqs 100..199
    assert rep.lost_after_resume == 1
    assert rep.black_hole_ms == 1.5
    assert rep.last_loss_ms == 0.5


def test_never_converged() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, range(100)), P_START, P_END)
    assert rep.lost_while_paused == 100
    assert rep.lost_after_resume == 100
    assert rep.received == 100
    assert rep.converged is False
    assert rep.black_hole_ms == 99.0  # last send (seq 299) minus resume
    assert rep.last_loss_ms == 99.0


def test_nothing_sent_after_resume_is_not_converged_with_zero_black_hole() -> None:
    log = send_log(150)
    rep = analyze(log, deliver(log, range(100)), P_START, P_END)
    assert rep.lost_while_paused == 50
    assert rep.lost_after_resume == 0
    assert rep.converged is False
    assert rep.black_hole_ms == 0.0
    assert rep.last_loss_ms is None


def test_lost_before_pause_is_reported() -> None:
    log = send_log()
    rep = analyze(log, deliver(log, except_(300, 3, 50, 51)), P_START, P_END)
    assert rep.lost_before_pause == 3
    assert rep.lost == 3
    assert (rep.lost_while_paused, rep.lost_after_resume) == (0, 0)


def test_duplicates_are_counted_once_each_extra_copy() -> None:
    log = send_log()
    seqs = [*range(300), 10, 10, 250]
    rep = analyze(log, deliver(log, seqs), P_START, P_END)
    assert rep.duplicates == 3
    assert rep.received == 300
    assert rep.lost == 0
    assert rep.reordered == 0  # a duplicate is not also a reordering


def test_reordering_counts_late_first_copies() -> None:
    log = send_log()
    # 5 overtaken by 6 and 7; two packets sent just before the pause (98, 99)
    # held up and delivered after 150 -> three reordered packets.
    seqs = [*range(5), 6, 7, 5, *range(8, 98), *range(100, 151), 98, 99, *range(151, 300)]
    assert sorted(seqs) == list(range(300))
    rep = analyze(log, deliver(log, seqs), P_START, P_END)
    assert rep.reordered == 3
    assert rep.lost == 0
    assert rep.duplicates == 0


def test_arrival_order_comes_from_recv_ns_not_list_order() -> None:
    log = send_log(10)
    recs = deliver(log, range(10))
    shuffled = list(reversed(recs))
    assert analyze(log, shuffled, T0, T0).reordered == 0


def test_other_streams_ignored_and_foreign_seqs_unexpected() -> None:
    log = send_log()
    other = send_log(stream="other")
    recs = deliver(log, range(300)) + deliver(other, range(0, 300, 2))
    recs.append(Recv("s", 300, T0 + 300 * MS, T0 + 301 * MS))  # beyond the send log
    recs.append(Recv("s", -1, T0, T0 + 302 * MS))
    rep = analyze(log, recs, P_START, P_END)
    assert rep.unexpected == 2
    assert rep.received == 300
    assert rep.lost == 0
    assert rep.duplicates == 0
    assert analyze(other, recs, P_START, P_END).lost == 150


def test_nonzero_first_seq() -> None:
    log = SendLog(stream="s", send_ns=[T0 + i * MS for i in range(10)], first_seq=1000)
    recs = deliver(log, [1000, 1001, 1003, 1005, 1006, 1007, 1008, 1009])
    rep = analyze(log, recs, T0 + 2 * MS, T0 + 5 * MS)
    assert rep.lost_while_paused == 2  # 1002, 1004
    assert rep.black_hole_ms == 0.0
    assert probe.lost_seqs(log, recs) == [1002, 1004]


def test_empty_and_invalid_inputs() -> None:
    empty = SendLog(stream="s", send_ns=[])
    rep = analyze(empty, [], P_START, P_END)
    assert (rep.sent, rep.received, rep.lost, rep.converged) == (0, 0, 0, False)
    with pytest.raises(ValueError):
        analyze(send_log(), [], P_END, P_START)


def test_lost_seqs() -> None:
    log = send_log(20)
    assert probe.lost_seqs(log, deliver(log, except_(20, 3, range(10, 13)))) == [3, 10, 11, 12]


# -- log files -------------------------------------------------------------


def test_send_log_round_trip(tmp_path: Path) -> None:
    log = send_log(30_000)  # 30 s at 1000 pps
    log.dst, log.port, log.rate, log.duration = "2001:db8::1", 9000, 1000.0, 30.0
    log.errors = [(5, 101), (6, 101)]
    log.late, log.max_lag_ns, log.reanchored = 3, 2_500_000, 0
    path = tmp_path / "s.json"
    probe.write_send_log(log, str(path))
    assert path.stat().st_size < 1_000_000
    again = probe.load_send_log(str(path))
    assert again == log
    assert (again.sent, again.first_send_ns, again.last_send_ns) == (
        30_000,
        T0,
        T0 + 29_999 * MS,
    )


def test_recv_log_round_trip_keeps_arrival_order(tmp_path: Path) -> None:
    a, b = send_log(100, "a"), send_log(100, "b")
    recs = sorted(deliver(a, range(100)) + deliver(b, range(99, -1, -1)), key=lambda r: r.recv_ns)
    path = tmp_path / "r.json"
    probe.write_recv_log(probe.RecvLog(bind="::", port=9000, records=recs), str(path))
    loaded = probe.load_recv_log(str(path))
    assert loaded == recs


def test_loaders_reject_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError):
        probe.load_send_log(str(path))
    with pytest.raises(ValueError):
        probe.load_recv_log(str(path))


# -- wire format -----------------------------------------------------------


def test_encode_decode() -> None:
    pkt = probe.encode("peer1-v6", 2**40 + 7, 123456789012345)
    assert pkt[:4] == b"VMMP"
    assert probe.decode(pkt) == ("peer1-v6", 2**40 + 7, 123456789012345)
    assert probe.decode(pkt[:10]) is None
    assert probe.decode(b"XXXX" + pkt[4:]) is None
    assert probe.decode(pkt[:-1]) is None  # truncated name
    with pytest.raises(ValueError):
        probe.encode("x" * 256, 0, 0)


# -- tables ----------------------------------------------------------------


def test_format_table_alignment() -> None:
    rows = [
        {"name": "v4", "n": 1000, "ms": 12.345, "ok": True, "last": None},
        {"name": "peer-v6", "n": 7, "ms": 0.0, "ok": False, "last": 3.25},
    ]
    cols = [("name", "stream"), ("n", "sent"), ("ms", "black hole"), ("ok", "ok"), ("last", "L")]
    assert probe.format_table(rows, cols).split("\n") == [
        "stream   sent  black hole  ok     L",
        "-------  ----  ----------  ---  ---",
        "v4       1000        12.3  yes    -",
        "peer-v6     7         0.0  no   3.2",
    ]


def test_format_table_format_spec_missing_keys_and_reports() -> None:
    table = probe.format_table([{"a": 1.5}, {}], [("a", "A", ".3f"), ("b", "B")])
    assert table.split("\n") == ["    A  B", "-----  -", "1.500", ""]
    log = send_log()
    rep = analyze(log, deliver(log, except_(300, range(100, 203))), P_START, P_END)
    text = probe.format_table([dataclasses.asdict(rep)], probe.REPORT_COLUMNS)
    assert text.splitlines()[2].split() == [
        *["s", "300", "197", "0", "100", "3", "0", "0", "3.0", "yes", "2.0"]
    ]


# -- real sockets (loopback, in-process and via the CLI) --------------------


def test_loopback_send_receive_in_process() -> None:
    ready = threading.Event()
    port: list[int] = []
    stop = threading.Event()
    result: list[probe.RecvLog] = []

    def on_ready(p: int) -> None:
        port.append(p)
        ready.set()

    t = threading.Thread(
        target=lambda: result.append(
            probe.receive_probes("127.0.0.1", 0, should_stop=stop.is_set, on_ready=on_ready)
        )
    )
    t.start()
    try:
        assert ready.wait(5)
        log = probe.send_probes("127.0.0.1", port[0], 2000, 0.1, "lo")
        time.sleep(0.05)
    finally:
        stop.set()
        t.join(5)
    # Absolute deadlines: exactly rate x duration packets, late ones caught up
    # (fewer only if a stall over MAX_CATCHUP_NS re-anchored the schedule).
    assert log.sent == 200 or (log.reanchored and log.sent < 200), log
    recs = result[0].records
    assert result[0].sources == {"lo": ["127.0.0.1"]}
    rep = analyze(log, recs, log.send_ns[-1] + 1, log.send_ns[-1] + 1)
    assert (rep.received, rep.lost, rep.duplicates) == (log.sent, 0, 0)
    assert all(r.recv_ns >= r.send_ns for r in recs)
    assert [r.send_ns for r in recs if r.stream == "lo"] == log.send_ns[: len(recs)]


def test_sender_stops_when_asked_and_never_runs_ahead() -> None:
    start = probe.now_ns()
    deadline = time.monotonic() + 0.05
    log = probe.send_probes(
        "127.0.0.1", 9, 1000, None, "x", should_stop=lambda: time.monotonic() >= deadline
    )
    elapsed_ms = (probe.now_ns() - start) / 1e6
    assert log.stopped_by_signal is True
    assert 1 <= log.sent <= elapsed_ms + 1  # paced, never faster than 1 per ms
    assert log.send_ns == sorted(log.send_ns)


def test_cli_sigterm_writes_logs(tmp_path: Path) -> None:
    """Both programs print "ready", stop on SIGTERM and still write their logs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "vmm_lab.linux.probe"]
    port = 20000 + os.getpid() % 20000
    recv = subprocess.Popen(
        [*cmd, "recv", "--bind", "::1", "--port", str(port), "--out", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    send = None
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        start = round(time.clock_gettime(time.CLOCK_MONOTONIC) + 0.2, 6)
        send = subprocess.Popen(
            [
                *cmd,
                "send",
                *("--dst", "::1", "--port", str(port), "--rate", "1000", "--stream", "cli"),
                *("--out", str(tmp_path / "s.json"), "--start-at", f"{start:.6f}"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert send.stdout is not None and send.stdout.readline().strip() == "ready"
        time.sleep(max(0.0, start - time.clock_gettime(time.CLOCK_MONOTONIC)) + 0.1)
        send.send_signal(signal.SIGTERM)
        assert send.wait(5) == 0
        time.sleep(0.05)
        recv.send_signal(signal.SIGTERM)
        assert recv.wait(5) == 0
    finally:
        for p in (recv, send):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    sent = probe.load_send_log(str(tmp_path / "s.json"))
    assert sent.stopped_by_signal and sent.sent > 0
    assert sent.first_send_ns is not None and sent.first_send_ns >= int(start * 1e9)
    rep = analyze(sent, probe.load_recv_log(str(tmp_path / "r.json")), 0, 0)
    assert (rep.received, rep.lost) == (sent.sent, 0)


def test_held_packets_report_the_latency_they_gained() -> None:
    """Packets sent while paused and delivered at the resume: counted as held, and
    their extra latency over the path's own is the wait until the resume."""
    log = send_log()
    got = []
    for seq, t in enumerate(log.send_ns):
        if P_START <= t < P_END:
            got.append(probe.Recv("s", seq, t, P_END + 1 * MS))  # released at the resume
        else:
            got.append(probe.Recv("s", seq, t, t + 1 * MS))
    rep = analyze(log, got, P_START, P_END)
    assert rep.lost == 0 and rep.reordered == 0
    assert rep.held == 100
    assert rep.base_latency_ms == 1.0
    assert rep.held_extra_ms_max == 100.0  # the first packet of the pause waited all of it
    assert rep.held_extra_ms_median is not None and 40.0 <= rep.held_extra_ms_median <= 60.0
