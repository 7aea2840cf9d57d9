"""libvirt events, delivered in order to one handler, across reconnections.

Modelled on nova's libvirt Host: libvirt's default event loop runs in one
native thread for the whole process (``virEventRunDefaultImpl``); the
callbacks it runs only put a small record on a queue, because they run on
that loop and anything slow there (or any libvirt call that waits for an
answer) stalls every connection's events and keepalives. A dispatcher thread
per source drains the queue and calls the handler, which may call libvirt.

At the source's SUSPENDED/MIGRATED, and at each MIGRATION_ITERATION while
the domain stays paused that way, the dispatcher (never the callback) reads
the outgoing migration job's statistics and hands them to the handler as a
``phases.JobProgress`` signal right after the event: libvirt signals an
operator's pause during a migration exactly like the switchover pause, and
only the job tells them apart (see vmm_libvirt.phases). QEMU answers that
read only after the final copy (it holds its big lock for all of it: 0.2-0.3
s on the libvirt lab, sometimes after the destination already resumed), so
the dispatcher waits for it at most ``final_copy_wait`` and otherwise hands
in "QEMU busy", which is the final copy's signature: an operator's pause is
answered within a millisecond or two (11 ms at worst on a
loaded host). The read goes on in a thread of its
own and its late answer is dropped.

A connection thread per source opens the connection, turns keepalive on,
registers the callbacks, then reads every domain's state and job and queues
it as a ``Reconciled`` record. Registering before reading means nothing that
happens in between is lost (it may be seen twice, which the phase rules
tolerate). When the connection closes (libvirtd restarted, keepalive timed
out) it reconnects with exponential backoff and does the same again, so a
migration that began, ended or failed while disconnected is noticed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from vmm_libvirt import phases

LOG = logging.getLogger(__name__)


# -- the process-wide event loop -------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; callers see them as exceptions."""


def start_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once).

    Must happen before the first connection is opened: keepalive and event
    callbacks need an event loop on the client side.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run, name="libvirt-event-loop", daemon=True)
        _loop_thread.start()


# -- what the handler receives -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DomainSignal:
    """A libvirt event about one domain, normalized (``signal`` is a phases signal)."""

    uri: str
    uuid: str
    name: str
    signal: phases.Signal
    monotonic: float


@dataclasses.dataclass(frozen=True)
class DomainInfo:
    """One domain as read at (re)connection: its state, job and XML."""

    uuid: str
    name: str
    observed: phases.Observed
    xml: str | None


@dataclasses.dataclass(frozen=True)
class Reconciled:
    """Every domain of the host, read right after callbacks were (re)registered."""

    uri: str
    domains: tuple[DomainInfo, ...]
    monotonic: float
    generation: int


@dataclasses.dataclass(frozen=True)
class Connected:
    uri: str
    generation: int
    monotonic: float


@dataclasses.dataclass(frozen=True)
class Disconnected:
    uri: str
    reason: str
    monotonic: float


Item = DomainSignal | Reconciled | Connected | Disconnected

CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}


class NotConnected(Exception):
    """The source has no open connection to libvirt right now."""


def _progress(dom: Any, stats: dict[str, Any]) -> phases.JobProgress | None:
    """``stats`` (libvirt's job statistics) as a JobProgress; None unless an outgoing migration."""
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return phases.JobProgress(active=False)
    operation = stats.get("operation")
    if operation is not None and operation != phases.JOB_MIGRATION_OUT:
        return None
    downtime: int | None = None
    with contextlib.suppress(libvirt.libvirtError):
        downtime = int(dom.migrateGetMaxDowntime(0))
    return phases.JobProgress(
        active=True,
        remaining=stats.get("memory_remaining"),
        bps=stats.get("memory_bps"),
        max_downtime_ms=downtime,
    )


def read_job_progress(conn: Any, uuid: str) -> phases.JobProgress | None:
    """The outgoing migration job of domain ``uuid`` now; None when libvirt cannot tell.

    A domain that is gone (a transient one that left by migration) has no job
    any more: ``JobProgress(active=False)``. Other libvirt errors propagate.
    """
    try:
        dom = conn.lookupByUUIDString(uuid)
        stats = dom.jobStats()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return phases.JobProgress(active=False)
        raise
    return _progress(dom, stats)


def read_domain(dom: Any) -> DomainInfo:
    """State, reason, active job operation (and an outgoing job's progress) and XML."""
    state, reason = dom.state()
    active = bool(dom.isActive())
    operation: int | None = None
    progress: phases.JobProgress | None = None
    if active:
        with contextlib.suppress(libvirt.libvirtError):  # not every driver has job stats
            stats = dom.jobStats()
            if stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE:
                operation = stats.get("operation")
                if operation == phases.JOB_MIGRATION_OUT:
                    progress = _progress(dom, stats)
    xml = None
    with contextlib.suppress(libvirt.libvirtError):
        xml = dom.XMLDesc(0)
    observed = phases.Observed(active, state, reason, operation, progress)
    return DomainInfo(dom.UUIDString(), dom.name(), observed, xml)


class _TimedRead:
    """Run ``call`` in a daemon thread of its own; ``done`` is set when it returned.

    A libvirt call cannot be cancelled, so the caller waits on ``done`` as long as
    it wants and leaves the thread to finish (and its answer to be dropped)."""

    def __init__(self, call: Callable[[], phases.JobProgress | None]) -> None:
        self.done = threading.Event()
        self.result: phases.JobProgress | None = None
        self.error: BaseException | None = None
        self._call = call
        threading.Thread(target=self._run, name="libvirt-job-read", daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # handed to the waiting dispatcher
            self.error = exc
        finally:
            self.done.set()


class LibvirtEventSource:
    """Watch one libvirt URI and hand its events to ``handler``, one at a time, in order.

    ``handler`` runs on this source's dispatcher thread; its exceptions are
    logged and never stop the source. ``connection()`` gives the handler (and
    stages) the current connection.
    """

    def __init__(
        self,
        uri: str,
        handler: Callable[[Item], None],
        keepalive_interval: int = 5,
        keepalive_count: int = 3,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        name: str | None = None,
        final_copy_wait: float = 0.015,
    ) -> None:
        self.uri = uri
        self.name = name or uri
        self.handler = handler
        self.keepalive = (keepalive_interval, keepalive_count)
        self.initial_delay = initial_delay
        self.max_delay = max(max_delay, initial_delay)
        self.final_copy_wait = final_copy_wait
        self.generation = 0
        self.attempts = 0
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._close_reason = "unknown"
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        #: Domains whose last state change was SUSPENDED/MIGRATED (dispatcher thread only).
        self._paused: set[str] = set()

    @classmethod
    def from_conf(
        cls, conf: Any, uri: str, handler: Callable[[Item], None], name: str | None = None
    ) -> LibvirtEventSource:
        """A source configured by [libvirt]: the contract of the event_sources entry point."""
        opts = conf.libvirt
        return cls(
            uri,
            handler,
            keepalive_interval=opts.keepalive_interval,
            keepalive_count=opts.keepalive_count,
            initial_delay=opts.reconnect_initial_delay,
            max_delay=opts.reconnect_max_delay,
            name=name,
            final_copy_wait=opts.final_copy_wait_ms / 1000.0,
        )

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        start_event_loop()
        self._stop.clear()
        for target, kind in ((self._dispatch_loop, "dispatch"), (self._connect_loop, "connect")):
            thread = threading.Thread(
                target=target, name=f"libvirt-{kind}-{self.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the connection and stop both threads; queued items are still handled."""
        self._stop.set()
        self._closed.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def connection(self) -> Any:
        """The open connection; NotConnected while there is none."""
        with self._conn_lock:
            if self._conn is None:
                raise NotConnected(f"not connected to {self.uri}")
            return self._conn

    @property
    def connected(self) -> bool:
        with self._conn_lock:
            return self._conn is not None

    # -- callbacks: run on the libvirt event loop; they only enqueue ----------------

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self._put(dom, phases.Lifecycle(event, detail))

    def _on_iteration(self, _conn: Any, dom: Any, iteration: int, _opaque: Any) -> None:
        self._put(dom, phases.Iteration(iteration))

    def _on_job_completed(self, _conn: Any, dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self._put(dom, phases.JobCompleted(params.get(libvirt.VIR_DOMAIN_JOB_OPERATION)))

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._close_reason = CLOSE_REASONS.get(reason, str(reason))
        self._closed.set()

    def _put(self, dom: Any, signal: phases.Signal) -> None:
        # UUIDString() and name() read the local handle: no round trip to libvirtd.
        now = time.monotonic()
        self._queue.put(DomainSignal(self.uri, dom.UUIDString(), dom.name(), signal, now))

    # -- dispatcher thread --------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._handle(item)
            if self._wants_progress(item):
                assert isinstance(item, DomainSignal)
                progress = self._job_progress(item.uuid)
                if progress is not None:
                    now = time.monotonic()
                    self._handle(DomainSignal(item.uri, item.uuid, item.name, progress, now))

    def _handle(self, item: Item) -> None:
        try:
            self.handler(item)
        except Exception:
            LOG.exception("%s: handling %s failed", self.name, item)

    def _wants_progress(self, item: Item) -> bool:
        """Whether the job's statistics should follow ``item``: after the pause of a
        migration, and after each migration iteration while it stays paused."""
        if isinstance(item, Disconnected):
            self._paused.clear()
            return False
        if isinstance(item, Reconciled):  # it read each job itself; later iterations re-read
            self._paused = {
                d.uuid
                for d in item.domains
                if d.observed.job_operation == phases.JOB_MIGRATION_OUT
                and (d.observed.state, d.observed.reason)
                == (phases.STATE_PAUSED, phases.PAUSED_MIGRATION)
            }
            return False
        if not isinstance(item, DomainSignal):
            return False
        signal = item.signal
        if isinstance(signal, phases.Lifecycle):
            if (signal.event, signal.detail) == (
                phases.Event.SUSPENDED,
                phases.SUSPENDED_MIGRATED,
            ):
                self._paused.add(item.uuid)
                return True
            if signal.event not in (phases.Event.DEFINED, phases.Event.UNDEFINED):
                self._paused.discard(item.uuid)
            return False
        return isinstance(signal, phases.Iteration) and item.uuid in self._paused

    def _job_progress(self, uuid: str) -> phases.JobProgress | None:
        try:
            conn = self.connection()
        except NotConnected as exc:
            LOG.info("%s: cannot read the migration job of %s: %s", self.name, uuid, exc)
            return None
        read = _TimedRead(lambda: read_job_progress(conn, uuid))
        if not read.done.wait(self.final_copy_wait):
            waited = round(self.final_copy_wait * 1000)
            LOG.info(
                "%s: QEMU did not answer for %s in %d ms: the final copy", self.name, uuid, waited
            )
            return phases.JobProgress(active=True, busy_ms=waited)
        if isinstance(read.error, libvirt.libvirtError):
            LOG.info("%s: cannot read the migration job of %s: %s", self.name, uuid, read.error)
            return None
        if read.error is not None:
            raise read.error
        progress = read.result
        if progress is not None and not progress.active:
            self._paused.discard(uuid)
        return progress

    # -- connection thread --------------------------------------------------------------

    def _connect_loop(self) -> None:
        delay = self.initial_delay
        failing_since: float | None = None
        while not self._stop.is_set():
            self.attempts += 1
            try:
                conn, callbacks = self._open()
            except libvirt.libvirtError as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    LOG.warning("%s: cannot connect to %s: %s", self.name, self.uri, exc)
                else:
                    LOG.debug("%s: still cannot connect: %s", self.name, exc)
                LOG.info("%s: next attempt to connect in %.2f s", self.name, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_delay)
                continue
            if failing_since is not None:
                LOG.warning(
                    "%s: connected to %s again after %.1f s",
                    self.name,
                    self.uri,
                    time.monotonic() - failing_since,
                )
                failing_since = None
            delay = self.initial_delay
            self._serve(conn, callbacks)

    def _open(self) -> tuple[Any, list[int]]:
        """Open, keepalive, close callback, event callbacks: all or nothing."""
        conn = libvirt.open(self.uri)
        callbacks: list[int] = []
        try:
            try:
                conn.setKeepAlive(*self.keepalive)
            except libvirt.libvirtError as exc:  # local drivers (test:///) have no keepalive
                LOG.debug("%s: no keepalive: %s", self.name, exc)
            self._closed.clear()
            self._close_reason = "unknown"
            try:
                conn.registerCloseCallback(self._on_close, None)
            except libvirt.libvirtError as exc:
                LOG.debug("%s: no close callback: %s", self.name, exc)
            for event_id, callback in (
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, self._on_iteration),
                (libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed),
            ):
                try:
                    callbacks.append(conn.domainEventRegisterAny(None, event_id, callback, None))
                except libvirt.libvirtError as exc:
                    if event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE:
                        raise
                    LOG.info("%s: event %d not available: %s", self.name, event_id, exc)
        except BaseException:
            self._release(conn, callbacks)
            raise
        return conn, callbacks

    def _serve(self, conn: Any, callbacks: list[int]) -> None:
        """Publish the connection, reconcile, and wait until it closes."""
        self.generation += 1
        generation = self.generation
        with self._conn_lock:
            self._conn = conn
        self._queue.put(Connected(self.uri, generation, time.monotonic()))
        LOG.info("%s: connected to %s (connection %d)", self.name, self.uri, generation)
        try:
            domains = tuple(self._read_all(conn))
        except libvirt.libvirtError as exc:
            LOG.warning("%s: reading the domains failed: %s", self.name, exc)
            self._closed.set()
        else:
            self._queue.put(Reconciled(self.uri, domains, time.monotonic(), generation))
        # The close callback is the fast path; isAlive() (no round trip) catches
        # drivers without one.
        while not self._stop.is_set() and not self._closed.wait(1.0):
            if not conn.isAlive():
                self._close_reason = "connection no longer alive"
                break
        with self._conn_lock:
            self._conn = None
        reason = "stopped" if self._stop.is_set() else self._close_reason
        if not self._stop.is_set():
            LOG.warning("%s: connection to %s lost (%s)", self.name, self.uri, reason)
        self._release(conn, callbacks)
        self._queue.put(Disconnected(self.uri, reason, time.monotonic()))

    @staticmethod
    def _read_all(conn: Any) -> list[DomainInfo]:
        found = []
        for dom in conn.listAllDomains(0):
            try:
                found.append(read_domain(dom))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return found

    def _release(self, conn: Any, callbacks: list[int]) -> None:
        """Deregister and close; a dead connection makes every step fail, which is fine."""
        for callback_id in callbacks:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
