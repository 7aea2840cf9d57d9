"""Prometheus metrics of the agent and of the embedded directory, and their exporter.

What an operator watches across a fleet: how many migrations start,
succeed, fail (in which phase, for which reason) and are reverted; how long
each stage takes; how long after the VM resumed its first announcement left
(the loss window); how long each peer NVE took to apply the move; how many
announcement frames went out per kind; how many state entries moved and how
long they held the pause; how far each NVE lags behind the directory; how
many libvirt hook calls the agent answered and how many it vetoed.

Everything engine-side comes from one place: :func:`observe` is an engine
observer (:func:`vmm_orchestrator.engine.add_observer`) reading each
PhaseReport and its stages' notes, so the stages need no metrics code.
Names follow the Prometheus conventions: base units in the name
(``_seconds``), ``_total`` for counters, bounded label values only (stage,
phase, role, host, peer NVE, kind; never a migration id or an error text).

The exporter is a small HTTP server on ``[metrics] bind_host``/``port``
(off unless ``[metrics] enabled``). Prometheus' own ``start_http_server``
has no authentication: this one checks an optional bearer token in constant
time (``hmac.compare_digest``) and refuses to listen beyond loopback without
one, since the figures describe the fleet's topology.
"""

from __future__ import annotations

import collections
import hmac
import http.server
import ipaddress
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Self

from oslo_config import cfg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from vmm_orchestrator import journal as jr
from vmm_orchestrator.errors import ConfigError
from vmm_orchestrator.model import Phase
from vmm_orchestrator.options import require

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vmm_orchestrator.engine import PhaseReport, Pipeline

LOG = logging.getLogger(__name__)

GROUP = "metrics"

METRICS_OPTS: list[cfg.Opt] = [
    cfg.BoolOpt(
        "enabled",
        default=False,
        help="Serve Prometheus metrics on bind_host:port (GET /metrics).",
    ),
    cfg.StrOpt(
        "bind_host",
        default="127.0.0.1",
        help="Address the metrics endpoint listens on. Anything but a loopback "
        "address needs a token: the figures describe the fleet.",
    ),
    cfg.PortOpt(
        "port",
        default=9798,
        help="TCP port of the agent's metrics endpoint (0: any free port).",
    ),
    cfg.PortOpt(
        "directory_port",
        default=9799,
        help="TCP port of the embedded directory's metrics endpoint (`vmm nva serve`), "
        "so an agent and the directory on one host can share this file.",
    ),
    cfg.StrOpt(
        "token",
        secret=True,
        help="When set, a scrape must send 'Authorization: Bearer <token>' "
        "(Prometheus: authorization { credentials_file: ... }).",
    ),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register [metrics]; calling it again is harmless."""
    for opt in METRICS_OPTS:
        try:
            conf.register_opt(opt, group=GROUP)
        except cfg.DuplicateOptError:
            pass


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator."""
    return [(GROUP, METRICS_OPTS)]


# ------------------------------------------------------------------ metrics

#: The process' registry: only this project's metrics and the process' own.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

#: Stages take from a millisecond (a bridge entry) to seconds (hold timer, acks).
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Loss windows: what matters is the first tens of milliseconds.
_FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

MIGRATIONS_STARTED = Counter(
    "vmm_migrations_started_total",
    "Migrations this host began to handle, by role.",
    ["host", "role"],
    registry=REGISTRY,
)
MIGRATIONS_SUCCEEDED = Counter(
    "vmm_migrations_succeeded_total",
    "Migrations whose last phase on this host succeeded, by role.",
    ["host", "role"],
    registry=REGISTRY,
)
MIGRATIONS_FAILED = Counter(
    "vmm_migrations_failed_total",
    "Migrations that failed on this host, by the phase they failed in and the reason "
    "(the failing stage's name, or what went wrong when no stage failed).",
    ["host", "role", "phase", "reason"],
    registry=REGISTRY,
)
MIGRATIONS_REVERTED = Counter(
    "vmm_migrations_reverted_total",
    "Migrations whose stages this host reverted, by the phase that reverted them and "
    "why (aborted, stage_failed, recovery).",
    ["host", "role", "phase", "reason"],
    registry=REGISTRY,
)
PHASE_DURATION = Histogram(
    "vmm_phase_duration_seconds",
    "From the hypervisor's signal until the phase's last stage ended.",
    ["phase", "role", "outcome"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "vmm_stage_duration_seconds",
    "Duration of each stage run or revert, all attempts together.",
    ["stage", "phase", "outcome"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
FIRST_ANNOUNCEMENT = Histogram(
    "vmm_resumed_to_first_announcement_seconds",
    "From the RESUMED signal until the first announcement frame left the destination.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
PEER_CONVERGENCE = Histogram(
    "vmm_peer_convergence_seconds",
    "From the directory commit until each peer NVE acknowledged the move.",
    ["peer"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
PEER_LAGGARDS = Counter(
    "vmm_peer_laggards_total",
    "Peers that did not acknowledge a move in time and were told to expire the entry.",
    ["peer"],
    registry=REGISTRY,
)
ANNOUNCEMENTS = Counter(
    "vmm_announcements_sent_total",
    "Announcement frames handed to the kernel, by kind (garp, arp_reply, na, rarp).",
    ["kind"],
    registry=REGISTRY,
)
GUEST_ANNOUNCEMENTS = Counter(
    "vmm_libvirt_announcements_total",
    "Announcements through libvirt (guest agent, QMP), by method and outcome.",
    ["method", "outcome"],
    registry=REGISTRY,
)
STATE_ENTRIES = Counter(
    "vmm_state_entries_moved_total",
    "State entries installed at the destination, by kind and stage "
    "(state_precopy before the pause, state_delta inside it).",
    ["kind", "stage"],
    registry=REGISTRY,
)
STATE_PAUSE = Histogram(
    "vmm_state_pause_seconds",
    "Time a kind's delta took inside the pause (export + import in state_delta).",
    ["kind"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
HOOK_CALLS = Counter(
    "vmm_hook_calls_total",
    "libvirt hook calls the relay forwarded to this agent, by operation.",
    ["operation", "sub_operation"],
    registry=REGISTRY,
)
HOOK_VETOES = Counter(
    "vmm_hook_vetoes_total",
    "Hook calls this agent answered with a veto (the migration was refused).",
    ["operation", "sub_operation"],
    registry=REGISTRY,
)


def count_announcement(kind: str) -> None:
    """One announcement frame of ``kind`` left (called by the announcer)."""
    ANNOUNCEMENTS.labels(kind=kind).inc()


def count_hook(operation: str, sub_operation: str, answer: dict[str, Any]) -> None:
    """One relayed hook call and the agent's answer ({"allow": bool, ...})."""
    labels = {"operation": operation or "-", "sub_operation": sub_operation or "-"}
    HOOK_CALLS.labels(**labels).inc()
    if not answer.get("allow", True):
        HOOK_VETOES.labels(**labels).inc()


# ------------------------------------------------------- the engine observer


class _Seen:
    """Bounded memory of (host, migration) pairs, so a migration counts once."""

    def __init__(self, size: int = 10000) -> None:
        self._items: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, key: tuple[str, str]) -> bool:
        """True when ``key`` is new."""
        with self._lock:
            if key in self._items:
                return False
            self._items[key] = None
            if len(self._items) > self._size:
                self._items.popitem(last=False)
            return True


_STARTED = _Seen()
_FINISHED = _Seen()


def _failure_reason(report: PhaseReport) -> str:
    """A bounded label value: the stage that failed, else the kind of failure."""
    for t in report.timeline:
        if t.outcome == "failed" and t.phase is report.phase and report.phase is not Phase.ABORTED:
            return t.stage
    error = report.error or ""
    if "revert errors" in error:
        return "revert_failed"
    if "is journalled on host" in error:
        return "role_mismatch"
    if "failed earlier" in error:
        return "failed_earlier"
    if "cannot locate workload" in error:
        return "recovery_locate"
    return "other"


def observe(pipeline: Pipeline, report: PhaseReport, origin: float) -> None:
    """Engine observer: count the report's migration outcome and its stages' figures."""
    detail = report.detail or ""
    if detail.startswith("ignored") or detail == "handled by another instance":
        return
    host, role = report.host, report.role.value
    key = (host, report.migration_id)
    if _STARTED.add(key):
        MIGRATIONS_STARTED.labels(host=host, role=role).inc()
    _stage_figures(report, origin)
    end = max((t.started_offset_ms + t.duration_ms for t in report.timeline), default=0.0)
    PHASE_DURATION.labels(
        phase=report.phase.value, role=role, outcome="ok" if report.ok else "failed"
    ).observe(max(0.0, end) / 1000.0)
    if report.reverted:
        if report.phase is Phase.ABORTED:
            why = "aborted"
        elif detail.startswith("recovered"):
            why = "recovery"
        else:
            why = "stage_failed"
        MIGRATIONS_REVERTED.labels(host=host, role=role, phase=report.phase.value, reason=why).inc()
    if not report.ok:
        if _FINISHED.add(key):
            MIGRATIONS_FAILED.labels(
                host=host, role=role, phase=report.phase.value, reason=_failure_reason(report)
            ).inc()
        return
    record = pipeline.journal.get(report.migration_id)
    if record is not None and record.status == jr.DONE and _FINISHED.add(key):
        MIGRATIONS_SUCCEEDED.labels(host=host, role=role).inc()


def _stage_figures(report: PhaseReport, origin: float) -> None:
    for t in report.timeline:
        STAGE_DURATION.labels(stage=t.stage, phase=t.phase.value, outcome=t.outcome).observe(
            t.duration_ms / 1000.0
        )
        notes = t.notes
        first = notes.get("first_frame_monotonic")
        if first is not None:
            FIRST_ANNOUNCEMENT.observe(max(0.0, float(first) - origin))
        for peer, ms in (notes.get("convergence_ms") or {}).items():
            PEER_CONVERGENCE.labels(peer=peer).observe(float(ms) / 1000.0)
        for peer in notes.get("laggards") or []:
            PEER_LAGGARDS.labels(peer=peer).inc()
        announce = notes.get("announce")
        if isinstance(announce, dict):
            for method, outcome in announce.items():
                GUEST_ANNOUNCEMENTS.labels(
                    method=method, outcome="ok" if outcome == "ok" else "failed"
                ).inc()
        kinds = notes.get("kinds")
        if isinstance(kinds, dict) and t.outcome == "ok":
            for kind, figures in kinds.items():
                if not isinstance(figures, dict):
                    continue
                STATE_ENTRIES.labels(kind=kind, stage=t.stage).inc(
                    int(figures.get("installed") or 0)
                )
                if t.stage == "state_delta":
                    ms = float(figures.get("import_ms") or 0) + float(figures.get("export_ms") or 0)
                    STATE_PAUSE.labels(kind=kind).observe(ms / 1000.0)


# ---------------------------------------------------- the directory's figures


class DirectoryCollector(Collector):
    """Read at each scrape: the directory's revision and how far each NVE lags.

    An NVE agent acknowledges the revision it has applied; the lag is the
    directory's revision minus that. A lag that stays above zero is an NVE
    forwarding on stale entries.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "vmm_nva_up", "1 when the directory answered this scrape, else 0 (see the log)."
        )
        try:
            revision = int(self.store.revision)
            nves = list(self.store.list_nves())
        except Exception as exc:  # etcd unreachable: the other metrics are still served
            LOG.warning("metrics: cannot read the directory: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily(
            "vmm_nva_revision", "Revision of the directory's newest change.", value=revision
        )
        lag = GaugeMetricFamily(
            "vmm_nva_nve_lag_revisions",
            "Directory revision minus the revision each NVE acknowledged.",
            labels=["nve"],
        )
        for nve in nves:
            lag.add_metric([str(nve["id"])], max(0, revision - int(nve["acked_revision"])))
        yield lag


def watch_directory(store: Any) -> DirectoryCollector:
    """Export ``store``'s revision lag per NVE from this process (``vmm nva serve``)."""
    collector = DirectoryCollector(store)
    REGISTRY.register(collector)
    return collector


def unwatch_directory(collector: DirectoryCollector) -> None:
    REGISTRY.unregister(collector)


# ---------------------------------------------------------------- exporter


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "vmm-metrics/1"

    @property
    def _exporter(self) -> MetricsExporter:
        return self.server.exporter  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        exporter = self._exporter
        if not exporter.authorized(self.headers.get("Authorization")):
            self._answer(401, b"unauthorized\n", "text/plain", {"WWW-Authenticate": "Bearer"})
            return
        path = self.path.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            self._answer(404, b"not found: try /metrics\n", "text/plain")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(exporter.registry)
        except Exception:
            LOG.exception("metrics: a collector failed")
            self._answer(500, b"a collector failed; see the log\n", "text/plain")
            return
        self._answer(200, body, content_type)

    def _answer(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("metrics: " + format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], exporter: MetricsExporter) -> None:
        self.exporter = exporter
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsExporter:
    """``GET /metrics`` of ``registry`` on host:port, in a daemon thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9798,
        token: str | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if not token and not _is_loopback(host):
            raise ConfigError(
                f"[metrics] bind_host {host} is not a loopback address and [metrics] token "
                "is not set",
                hint="set a token (scrapers send it as a bearer token) or bind to 127.0.0.1",
            )
        self.host, self.port = host, port
        self.registry = registry
        self._token = token.encode() if token else None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        #: Collectors registered for this exporter's life (the directory's lag).
        self.collectors: list[Collector] = []

    @classmethod
    def from_conf(cls, conf: cfg.ConfigOpts, directory: bool = False) -> MetricsExporter:
        """The agent's exporter, or with ``directory`` the embedded directory's."""
        require(conf, GROUP, "the metrics exporter")
        g = conf[GROUP]
        return cls(g.bind_host, g.directory_port if directory else g.port, g.token)

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the metrics exporter is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._httpd.server_address[1]}/metrics"

    def start(self) -> None:
        """Listen (ConfigError naming the option when the address is taken) and serve."""
        if self._httpd is not None:
            return
        try:
            self._httpd = _Server((self.host, self.port), self)
        except OSError as err:
            raise ConfigError(
                f"the metrics endpoint cannot listen on {self.host}:{self.port}: {err}",
                hint="check [metrics] bind_host and port",
            ) from err
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="vmm-metrics",
            daemon=True,
        )
        self._thread.start()
        LOG.info("metrics on %s", self.url)

    def stop(self) -> None:
        for collector in self.collectors:
            self.registry.unregister(collector)
        self.collectors.clear()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_from_conf(conf: cfg.ConfigOpts, directory: Any = None) -> MetricsExporter | None:
    """What a composition root calls once: observe every pipeline and, when
    ``[metrics] enabled``, serve the endpoint on ``[metrics] port``; with
    ``directory`` (the NvaStore of `vmm nva serve`) its revision lag per NVE
    on ``[metrics] directory_port``. Returns the exporter to stop, or None."""
    from vmm_orchestrator import engine

    require(conf, GROUP, "the metrics exporter")
    engine.add_observer(observe)
    if not conf[GROUP].enabled:
        return None
    exporter = MetricsExporter.from_conf(conf, directory=directory is not None)
    exporter.start()
    if directory is not None:
        exporter.collectors.append(watch_directory(directory))
    return exporter
