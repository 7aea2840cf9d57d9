"""The state framework end to end: two hosts' state services over real HTTP,
the stages, the engine, and a fake in-memory kind standing in for the
kernel tables (the real kinds are proved in the functional tests).

What must hold: only the migrating VM's entries leave the source; a
tampered, unsigned, replayed or poisoned bundle installs nothing; limits
are enforced; each FAIL reason gets its configured action (a resource
limit at PREPARE vetoes the move); ABORTED leaves the destination as it
was; COMPLETED removes the source's copies.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from oslo_config import cfg

from vmm_orchestrator.engine import Pipeline
from vmm_orchestrator.errors import ConfigError, StageFailed, VmmError
from vmm_orchestrator.journal import Journal
from vmm_orchestrator.model import Migration, MigrationEvent, Phase, Role, Vif, Workload
from vmm_orchestrator.options import new_conf
from vmm_orchestrator.stage import HostContext, StageContext
from vmm_orchestrator.statekind import ImportResult, KindContext, PoisonedEntry, Reason, StateKind
from vmm_state import registry
from vmm_state.bundle import MAC_SIZE
from vmm_state.service import StateHost, StateSettings, nva_voucher
from vmm_state.stages import StateCleanup, StateDelta, StatePrecopy
from vmm_state.wire import TlsFiles

KEY = b"state-key-0123456789abcdef"
TOKEN = "state-token"
VNI = 100
VIF = Vif("52:54:00:00:00:01", VNI, ("10.0.0.1",), ("fd00::1",), "tap-vm1")
OTHER = Vif("52:54:00:00:00:02", VNI, ("10.0.0.2",), (), "tap-vm2")
VM = Workload("vm1", (VIF,))
MIG = Migration("mig-1", VM, "h1", "h2")


# ------------------------------------------------------------ a fake kind


class Kernel:
    """The 'kernel tables' of every fake host: (netns, kind) -> key -> entry."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str | None, str], dict[tuple[Any, ...], dict[str, Any]]] = {}

    def table(self, netns: str | None, kind: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        return self.tables.setdefault((netns, kind), {})

    def add(self, netns: str, kind: str, vif: Vif, n: int, t: float | None = None) -> None:
        entry = {"mac": vif.mac, "ip": vif.ipv4[0], "peer": "192.0.2.9", "n": n}
        entry["t"] = time.time() - 100 if t is None else t
        self.table(netns, kind)[key(entry)] = entry


def key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry["mac"], entry["ip"], entry["peer"], entry["n"])


class FakeKind(StateKind):
    """A kind whose kernel is a dict; it can be told to misbehave."""

    name = "fake"

    def __init__(self, conf: cfg.ConfigOpts, kernel: Kernel, **behaviour: Any) -> None:
        super().__init__(conf)
        self.kernel = kernel
        self.capacity: int | None = behaviour.get("capacity")
        self.fail: list[Reason] = list(behaviour.get("fail", []))
        self.leak: dict[str, Any] | None = behaviour.get("leak")
        self.missing: str | None = behaviour.get("missing")

    def unavailable(self, ctx: KindContext) -> str | None:
        return self.missing

    def export(self, ctx: KindContext, since: float | None = None) -> Iterator[dict[str, Any]]:
        for entry in list(self.kernel.table(ctx.netns, self.name).values()):
            if entry["mac"] in ctx.macs and (since is None or entry["t"] >= since):
                yield dict(entry)
        if self.leak is not None:
            yield dict(self.leak)

    def check(self, ctx: KindContext, entry: dict[str, Any]) -> None:
        if set(entry) != {"mac", "ip", "peer", "n", "t"}:
            raise ValueError(f"unexpected fields {sorted(entry)}")
        if entry["mac"] not in ctx.macs or entry["ip"] not in ctx.addresses:
            raise PoisonedEntry(f"{entry['mac']}/{entry['ip']} is not the VM's")

    def import_(self, ctx: KindContext, entries: list[dict[str, Any]]) -> ImportResult:
        if self.fail:
            return ImportResult.fail(self.name, self.fail.pop(0), "told to fail")
        if self.capacity is not None and len(entries) > self.capacity:
            return ImportResult.fail(
                self.name, Reason.RESOURCE_LIMIT, f"{len(entries)} > room for {self.capacity}"
            )
        table = self.kernel.table(ctx.netns, self.name)
        for entry in entries:
            table[key(entry)] = entry
        return ImportResult.success(self.name, len(entries), {"keys": [key(e) for e in entries]})

    def revert_import(self, ctx: KindContext, record: dict[str, Any]) -> None:
        table = self.kernel.table(ctx.netns, self.name)
        for k in record["keys"]:
            table.pop(tuple(k), None)

    def cleanup_source(self, ctx: KindContext) -> None:
        table = self.kernel.table(ctx.netns, self.name)
        for k in [k for k, e in table.items() if e["mac"] in ctx.macs]:
            del table[k]


class FakeKind2(FakeKind):
    name = "fake2"


# ---------------------------------------------------------------- fixtures


class FakeNva:
    """The directory as the voucher sees it."""

    def __init__(self, endpoints: dict[str, dict[str, Any]]) -> None:
        self.endpoints = endpoints

    def get_endpoint(self, vni: int, mac: str) -> dict[str, Any]:
        if mac not in self.endpoints:
            raise VmmError(f"no endpoint {mac} in VNI {vni}")
        return self.endpoints[mac]


def directory() -> FakeNva:
    return FakeNva(
        {
            VIF.mac: {"ipv4": ["10.0.0.1"], "ipv6": ["fd00::1"], "nve": "h1", "pending_nve": "h2"},
            OTHER.mac: {"ipv4": ["10.0.0.2"], "ipv6": [], "nve": "h1", "pending_nve": None},
        }
    )


VOUCH_H1 = nva_voucher(directory(), "h1")


def make_conf(**overrides: Any) -> cfg.ConfigOpts:
    conf = new_conf()
    for name, value in overrides.items():
        conf.set_override(name, value, group="state")
    return conf


class Site:
    """Hosts with running state services and a shared peer map; stopped at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.kernel = Kernel()
        self.conf = make_conf()
        self.peers: dict[str, str] = {}
        self.hosts: dict[str, StateHost] = {}
        self.tmp_path = tmp_path

    def host(
        self,
        name: str,
        kinds: dict[str, dict[str, Any]] | None = None,
        vouch: Any = None,
        **settings: Any,
    ) -> StateHost:
        classes = {"fake": FakeKind, "fake2": FakeKind2}
        specs = {"fake": {}, "fake2": {}} if kinds is None else kinds
        objs = {n: classes[n](self.conf, self.kernel, **b) for n, b in specs.items()}
        base: dict[str, Any] = {
            "key_id": "k1",
            "key": KEY,
            "verify_keys": {"k1": KEY},
            "token": TOKEN,
            "bind_port": 0,
            "retry_delay": 0.01,
            "connect_timeout": 1.0,
            "read_timeout": 5.0,
        }
        base.update(settings)
        host = StateHost(name, f"ns-{name}", objs, StateSettings(**base), self.peers, vouch)
        host.start()
        self.hosts[name] = host
        self.peers[name] = host.url
        return host

    def table(self, host: str, kind: str = "fake") -> dict[tuple[Any, ...], dict[str, Any]]:
        return self.kernel.table(f"ns-{host}", kind)

    def stop(self) -> None:
        for host in self.hosts.values():
            host.stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.stop()


def seeded(site: Site, **h2: Any) -> tuple[StateHost, StateHost]:
    """h1 runs vm1 (3 fake + 2 fake2 entries) next to another VM; h2 is empty.

    h1 learns of the migration when h2 pulls: the directory vouches for it.
    """
    h1 = site.host("h1", vouch=VOUCH_H1)
    dest = site.host("h2", **h2)
    for n in range(3):
        site.kernel.add("ns-h1", "fake", VIF, n)
    for n in range(2):
        site.kernel.add("ns-h1", "fake2", VIF, n)
        site.kernel.add("ns-h1", "fake", OTHER, 100 + n)
    return h1, dest


def context(host: StateHost, phase: Phase, role: Role, migration: Migration = MIG) -> StageContext:
    services = {"state": host}
    deadline = time.monotonic() + 10.0
    return StageContext(migration, phase, role, HostContext(host.name, None, services), deadline)


def precopy(site: Site, h2: StateHost) -> tuple[dict[str, Any], StageContext]:
    ctx = context(h2, Phase.PREPARE, Role.DESTINATION)
    return StatePrecopy(site.conf).run(ctx), ctx


def delta(site: Site, h1: StateHost) -> tuple[dict[str, Any], StageContext]:
    ctx = context(h1, Phase.SWITCHOVER, Role.SOURCE)
    return StateDelta(site.conf).run(ctx), ctx


def vm_entries(site: Site, host: str, kind: str = "fake") -> list[int]:
    return sorted(e["n"] for e in site.table(host, kind).values() if e["mac"] == VIF.mac)


# ---------------------------------------------------------- the happy path


def test_precopy_moves_only_the_vms_entries_and_notes_the_figures(site: Site) -> None:
    _, h2 = seeded(site)
    record, ctx = precopy(site, h2)
    assert vm_entries(site, "h2") == [0, 1, 2]
    assert vm_entries(site, "h2", "fake2") == [0, 1]
    assert all(e["mac"] == VIF.mac for e in site.table("h2").values())  # not the other VM's
    # As the carrier, the importer tells each entry how long it travelled.
    assert all(0.0 <= e["age"] < 5.0 for e in site.table("h2").values())
    fake = ctx.notes["kinds"]["fake"]
    assert (fake["result"], fake["entries"], fake["installed"], fake["attempts"]) == (
        "SUCCESS",
        3,
        3,
        1,
    )
    assert ctx.notes["bytes"] > 0 and ctx.notes["at_risk"] == []
    assert sorted(i["kind"] for i in record["imports"]) == ["fake", "fake2"]


def test_the_delta_carries_what_changed_and_is_installed_before_the_answer(site: Site) -> None:
    h1, h2 = seeded(site)
    precopy(site, h2)
    site.kernel.add("ns-h1", "fake", VIF, 7, t=time.time())
    site.kernel.add("ns-h1", "fake", VIF, 8, t=time.time())
    _, ctx = delta(site, h1)
    # run() returned: the destination has installed the delta already.
    assert vm_entries(site, "h2") == [0, 1, 2, 7, 8]
    assert ctx.notes["kinds"]["fake"]["entries"] == 2  # only what changed travelled
    assert ctx.notes["kinds"]["fake2"]["entries"] == 0
    assert ctx.notes["kinds"]["fake"]["export_ms"] is not None
    assert ctx.notes["delta_ms"] > 0


def test_a_kind_the_destination_never_imported_is_sent_whole_in_the_delta(site: Site) -> None:
    h1, h2 = seeded(site)
    h2.expect(MIG)  # no pre-copy at all
    _, ctx = delta(site, h1)
    assert vm_entries(site, "h2") == [0, 1, 2]
    assert ctx.notes["kinds"]["fake"]["entries"] == 3


def test_completed_removes_the_source_copies_and_makes_the_import_final(site: Site) -> None:
    h1, h2 = seeded(site)
    precopy(site, h2)
    delta(site, h1)
    ctx = context(h1, Phase.COMPLETED, Role.SOURCE)
    record = StateCleanup(site.conf).run(ctx)
    assert vm_entries(site, "h1") == [] and vm_entries(site, "h1", "fake2") == []
    assert len(site.table("h1")) == 2  # the other VM's entries stay
    assert record == {"cleaned": ["fake", "fake2"], "failed": {}}
    assert h2.importer.ledger.entries(MIG.id) == []  # committed: nothing left to undo
    assert vm_entries(site, "h2") == [0, 1, 2]


# ------------------------------------------------------------ refusals


def bundle_bytes(h1: StateHost, migration: Migration = MIG) -> bytes:
    return b"".join(h1.export(migration, "delta"))


def push(h1: StateHost, data: bytes, migration: Migration = MIG) -> Any:
    return h1.peer("h2").push(migration, [data], label="delta", deadline=time.monotonic() + 5.0)


def test_a_tampered_byte_is_refused_and_nothing_is_installed(site: Site) -> None:
    h1, h2 = seeded(site)
    h2.expect(MIG)
    data = bundle_bytes(h1)
    position = data.index(b'"n":1') + 4
    tampered = data[:position] + b"7" + data[position + 1 :]
    report = push(h1, tampered)
    assert report.error.startswith("bad_signature: bundle signature does not verify")
    assert {a.kind: a.reason for a in report.answers.values()} == {
        "fake": Reason.POLICY_CONFLICT,
        "fake2": Reason.POLICY_CONFLICT,
    }
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}
    assert h2.importer.ledger.entries(MIG.id) == []
    assert push(h1, data).ok  # the untouched bundle goes through


def test_an_unsigned_bundle_is_refused_and_nothing_is_installed(site: Site) -> None:
    h1, h2 = seeded(site)
    h2.expect(MIG)
    report = push(h1, bundle_bytes(h1)[: -(5 + MAC_SIZE)])
    assert report.error.startswith("unsigned:")
    assert all(a.reason is Reason.POLICY_CONFLICT for a in report.answers.values())
    assert site.table("h2") == {}


def test_a_poisoned_entry_refuses_the_whole_bundle(site: Site) -> None:
    leak = {"mac": OTHER.mac, "ip": OTHER.ipv4[0], "peer": "192.0.2.9", "n": 5, "t": 0.0}
    site.host("h1", kinds={"fake": {}, "fake2": {"leak": leak}}, vouch=VOUCH_H1)
    h2 = site.host("h2")
    site.kernel.add("ns-h1", "fake", VIF, 1)
    with pytest.raises(StageFailed) as caught:
        precopy(site, h2)
    text = str(caught.value)
    assert "vetoes the migration" in text and "policy_conflict" in text
    assert "does not belong to VM vm1" in text and OTHER.mac in text
    # fake's own entry was valid, yet nothing of the bundle was installed
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}


def checking_early(host: StateHost) -> dict[str, int]:
    """Mark ``host``'s kinds as having a pure check (run while the bundle arrives);
    count the checks per kind."""
    calls: dict[str, int] = {}
    for kind in host.kinds.values():
        check = kind.check

        def counted(ctx: KindContext, entry: dict[str, Any], check: Any = check) -> None:
            calls[entry["mac"]] = calls.get(entry["mac"], 0) + 1
            check(ctx, entry)

        kind.CHECK_EARLY = True  # type: ignore[attr-defined]
        kind.check = counted  # type: ignore[method-assign]
    return calls


def test_a_poisoned_entry_checked_early_still_refuses_the_whole_bundle(site: Site) -> None:
    """The early check (while the bundle arrives) finds the leak; the importer
    checks that chunk again and refuses everything, installing nothing."""
    leak = {"mac": OTHER.mac, "ip": OTHER.ipv4[0], "peer": "192.0.2.9", "n": 5, "t": 0.0}
    site.host("h1", kinds={"fake": {}, "fake2": {"leak": leak}}, vouch=VOUCH_H1)
    h2 = site.host("h2")
    calls = checking_early(h2)
    site.kernel.add("ns-h1", "fake", VIF, 1)
    with pytest.raises(StageFailed) as caught:
        precopy(site, h2)
    assert "does not belong to VM vm1" in str(caught.value) and OTHER.mac in str(caught.value)
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}
    assert calls[OTHER.mac] == 2  # early, then again by the importer (which answers)


def test_entries_checked_early_are_installed_without_a_second_check(site: Site) -> None:
    _, h2 = seeded(site)
    calls = checking_early(h2)
    precopy(site, h2)
    assert vm_entries(site, "h2") == [0, 1, 2] and vm_entries(site, "h2", "fake2") == [0, 1]
    assert calls == {VIF.mac: 5}  # each entry once, while it arrived


def test_a_replayed_bundle_of_another_migration_is_refused(site: Site) -> None:
    h1, h2 = seeded(site)
    other = Migration("mig-2", VM, "h1", "h2")
    h2.expect(other)
    report = push(h1, bundle_bytes(h1, MIG), migration=other)
    assert report.error.startswith("wrong_bundle: bundle is for migration mig-1")
    assert site.table("h2") == {}


def test_an_entry_limit_vetoes_at_prepare_and_undoes_what_was_installed(site: Site) -> None:
    _, h2 = seeded(site, max_entries_per_kind={"fake": 2})
    with pytest.raises(StageFailed, match=r"fake: FAIL/resource_limit.*more than 2 entries"):
        precopy(site, h2)
    assert site.table("h2") == {}
    assert site.table("h2", "fake2") == {}  # installed, then undone by the veto
    assert h2.importer.ledger.entries(MIG.id) == []


def test_a_bundle_over_the_byte_limit_is_refused_with_an_answer(site: Site) -> None:
    h1, h2 = seeded(site, max_bundle_bytes=2048)
    for n in range(10, 200):
        site.kernel.add("ns-h1", "fake", VIF, n)
    h2.expect(MIG)
    with pytest.raises(StageFailed, match=r"FAIL/resource_limit.*larger than 2048 bytes"):
        delta(site, h1)
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}


def test_a_resource_limit_at_prepare_vetoes_the_migration_through_the_engine(
    site: Site, tmp_path: Path
) -> None:
    _, h2 = seeded(site, kinds={"fake2": {}, "fake": {"capacity": 2}})
    host_ctx = HostContext("h2", None, {"state": h2})
    pipeline = Pipeline(
        site.conf, host_ctx, Journal(str(tmp_path / "h2.sqlite")), [StatePrecopy(site.conf)]
    )
    report = pipeline.handle(MigrationEvent(MIG, Phase.PREPARE, Role.DESTINATION, time.monotonic()))
    assert not report.ok
    assert "state_precopy failed in PREPARE" in (report.error or "")
    assert "fake: FAIL/resource_limit after 1 attempt(s): 3 > room for 2" in (report.error or "")
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}


# --------------------------------------------------------------- policy


def test_a_failed_import_is_retried_for_that_kind_only(site: Site) -> None:
    _, h2 = seeded(site, kinds={"fake": {"fail": [Reason.TRANSFER_FAILED]}, "fake2": {}})
    _, ctx = precopy(site, h2)
    assert ctx.notes["kinds"]["fake"]["attempts"] == 2
    assert ctx.notes["kinds"]["fake2"]["attempts"] == 1
    assert ctx.notes["transfers"] == 2
    assert vm_entries(site, "h2") == [0, 1, 2] and vm_entries(site, "h2", "fake2") == [0, 1]


def test_an_unreachable_destination_is_retried_then_aborts(site: Site) -> None:
    h1, _ = seeded(site)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        site.peers["h2"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ctx = context(h1, Phase.SWITCHOVER, Role.SOURCE)
    with pytest.raises(StageFailed, match=r"FAIL/transfer_failed after 4 attempt\(s\)"):
        StateDelta(site.conf).run(ctx)
    assert ctx.notes["kinds"]["fake"]["attempts"] == 4
    assert "Connection refused" in ctx.notes["kinds"]["fake"]["detail"]


def test_a_kind_the_destination_lacks_continues_at_risk(site: Site) -> None:
    _, h2 = seeded(site, kinds={"fake": {}})
    record, ctx = precopy(site, h2)
    assert record["at_risk"] == ["fake2"] and ctx.notes["at_risk"] == ["fake2"]
    answer = ctx.notes["kinds"]["fake2"]
    assert answer["reason"] == "unsupported" and "not enabled on host h2" in answer["detail"]
    assert vm_entries(site, "h2") == [0, 1, 2]


def test_a_kind_the_source_cannot_hold_is_unsupported(site: Site) -> None:
    site.host("h1", kinds={"fake": {}, "fake2": {"missing": "no such module"}}, vouch=VOUCH_H1)
    h2 = site.host("h2")
    record, ctx = precopy(site, h2)
    assert record["at_risk"] == ["fake2"]
    assert "no such module" in ctx.notes["kinds"]["fake2"]["detail"]


def test_a_configured_abort_on_unsupported_stops_the_move(site: Site) -> None:
    _, h2 = seeded(site, kinds={"fake": {}})
    site.conf.set_override("on_unsupported", "abort", group="state")
    with pytest.raises(StageFailed, match="fake2: FAIL/unsupported"):
        precopy(site, h2)
    assert site.table("h2") == {}


# ---------------------------------------------------------------- aborted


def test_aborted_reverts_every_import_at_the_destination(site: Site, tmp_path: Path) -> None:
    h1, h2 = seeded(site)
    pipelines = {
        name: Pipeline(
            site.conf,
            HostContext(name, None, {"state": host}),
            Journal(str(tmp_path / f"{name}.sqlite")),
            [StatePrecopy(site.conf), StateDelta(site.conf)],
        )
        for name, host in (("h1", h1), ("h2", h2))
    }

    def event(host: str, phase: Phase, role: Role) -> Any:
        return pipelines[host].handle(MigrationEvent(MIG, phase, role, time.monotonic()))

    assert event("h2", Phase.PREPARE, Role.DESTINATION).ok
    site.kernel.add("ns-h1", "fake", VIF, 9, t=time.time())
    assert event("h1", Phase.SWITCHOVER, Role.SOURCE).ok
    assert vm_entries(site, "h2") == [0, 1, 2, 9]
    site.kernel.add("ns-h2", "fake", OTHER, 50)  # something of h2's own
    src = event("h1", Phase.ABORTED, Role.SOURCE)
    dst = event("h2", Phase.ABORTED, Role.DESTINATION)
    assert src.ok and src.reverted == ["state_delta"]
    assert dst.ok and dst.reverted == ["state_precopy"]
    assert vm_entries(site, "h2") == [] and site.table("h2", "fake2") == {}
    assert len(site.table("h2")) == 1  # h2's own entry is untouched
    assert vm_entries(site, "h1") == [0, 1, 2, 9]  # the VM stays: its source state too


def test_a_restarted_destination_still_reverts_from_its_ledger(site: Site, tmp_path: Path) -> None:
    _, h2 = seeded(site, ledger_dir=str(tmp_path / "ledger"))
    precopy(site, h2)
    h2.stop()
    again = StateHost(h2.name, h2.netns, h2.kinds, h2.settings)
    assert len(again.importer.ledger.entries(MIG.id)) == 2
    assert again.revert_imports(MIG) == (2, [])
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}


def test_without_a_ledger_the_journalled_record_reverts(site: Site) -> None:
    _, h2 = seeded(site)
    record, _ = precopy(site, h2)
    fresh = StateHost(h2.name, h2.netns, h2.kinds, h2.settings)  # memory ledger lost
    ctx = context(fresh, Phase.PREPARE, Role.DESTINATION)
    StatePrecopy(site.conf).revert(ctx, record)
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}


def test_a_precopy_finishing_after_the_engine_gave_up_undoes_itself(site: Site) -> None:
    _, h2 = seeded(site)
    ctx = context(h2, Phase.PREPARE, Role.DESTINATION)

    def abandoned(data: dict[str, Any]) -> None:
        raise StageFailed("stage state_precopy passed its deadline; its checkpoint is refused")

    ctx.checkpoint = abandoned
    with pytest.raises(StageFailed, match="passed its deadline"):
        StatePrecopy(site.conf).run(ctx)
    assert site.table("h2") == {} and site.table("h2", "fake2") == {}
    assert h2.importer.ledger.entries(MIG.id) == []


# ------------------------------------------------------- service security


def test_an_unannounced_migration_needs_the_directory_to_vouch(site: Site) -> None:
    site.host("h1")
    h2 = site.host("h2")
    site.kernel.add("ns-h1", "fake", VIF, 1)
    with pytest.raises(StageFailed, match="no directory is configured to vouch"):
        precopy(site, h2)
    site.hosts.pop("h1").stop()
    site.host("h1", vouch=nva_voucher(directory(), "h1"))
    precopy(site, h2)
    assert vm_entries(site, "h2") == [1]


def test_the_directory_refuses_a_vm_described_with_another_vms_address(site: Site) -> None:
    site.host("h1", vouch=nva_voucher(directory(), "h1"))
    h2 = site.host("h2")
    site.kernel.add("ns-h1", "fake", OTHER, 1)
    liar = Workload("vm1", (Vif(VIF.mac, VNI, ("10.0.0.1", "10.0.0.2"), ("fd00::1",), "tap"),))
    mig = Migration("mig-9", liar, "h1", "h2")
    ctx = context(h2, Phase.PREPARE, Role.DESTINATION, mig)
    with pytest.raises(StageFailed, match="the directory registers"):
        StatePrecopy(site.conf).run(ctx)
    assert site.table("h2") == {}


def test_a_wrong_token_is_refused_as_a_policy_conflict(site: Site) -> None:
    site.host("h1", token="another-token")
    h2 = site.host("h2")
    h2.expect(MIG)
    site.hosts["h1"].expect(MIG)
    with pytest.raises(StageFailed, match=r"policy_conflict.*invalid X-Auth-Token"):
        precopy(site, h2)


def test_the_service_refuses_bad_requests_with_clear_messages(site: Site) -> None:
    h1 = site.host("h1")
    h1.expect(MIG)
    url = f"{h1.url}/v1/state/{MIG.id}"
    headers = {"X-Auth-Token": TOKEN}
    answer = requests.get(url, params={"kinds": "fake,../x"}, headers=headers, timeout=5)
    assert answer.status_code == 400 and "kinds must be" in answer.json()["error"]["message"]
    answer = requests.put(url, headers=headers, timeout=5)
    assert answer.status_code == 405
    answer = requests.get(url, timeout=5)
    assert answer.status_code == 401
    answer = requests.post(url, params={"label": "delta"}, headers=headers, data=b"x", timeout=5)
    assert answer.status_code == 403  # h1 is not mig-1's destination
    answer = requests.get(f"{h1.url}/v1/state/mig-unknown", headers=headers, timeout=5)
    assert answer.status_code == 404
    assert "X-Vmm-Migration" in answer.json()["error"]["hint"]


def test_a_refused_chunked_upload_is_drained_and_the_connection_stays_usable(
    site: Site,
) -> None:
    h1 = site.host("h1", vouch=VOUCH_H1)
    h2 = site.host("h2", max_bundle_bytes=4096)
    for n in range(300):
        site.kernel.add("ns-h1", "fake", VIF, n)
    h2.expect(MIG)
    data = b"".join(h1.export(MIG, "delta"))
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i : i + 1000]), data[i : i + 1000])
                      for i in range(0, len(data), 1000))  # fmt: skip
    host, port = h2.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/state/{MIG.id}?label=delta HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    health = f"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + chunks + b"0\r\n\r\n" + health.encode())
        answers = b""
        while b'"host": "h2"' not in answers:
            got = sock.recv(65536)
            assert got, f"connection closed after {answers!r}"
            answers += got
    # The refusal was answered, then the same connection served the next request.
    assert answers.count(b"HTTP/1.1 200") == 2
    assert b"oversized" in answers and b"4096 bytes allowed" in answers
    assert site.table("h2") == {}


# ------------------------------------------------------------ configuration


def test_the_configuration_is_checked_with_clear_messages() -> None:
    with pytest.raises(ConfigError, match=r"\[state\] key is not set"):
        StateSettings.from_conf(make_conf(token="t"))
    with pytest.raises(ConfigError, match="at least 16 are needed"):
        StateSettings.from_conf(make_conf(key="short", token="t"))
    with pytest.raises(ConfigError, match="token is not set"):
        StateSettings.from_conf(make_conf(key="k" * 16))
    with pytest.raises(ConfigError, match="conntrack:lots is not a count"):
        StateSettings.from_conf(
            make_conf(key="k" * 16, token="t", max_entries_per_kind={"conntrack": "lots"})
        )
    with pytest.raises(ConfigError, match="must be set together"):
        StateSettings.from_conf(make_conf(key="k" * 16, token="t", cert_file="/x.pem"))
    ok = StateSettings.from_conf(
        make_conf(key="k" * 16, token="t", verify_keys={"old": "o" * 16}, key_id="new")
    )
    assert set(ok.verify_keys) == {"old", "new"} and ok.key == b"k" * 16


def test_kinds_are_loaded_strictly() -> None:
    conf = make_conf()
    assert registry.load_kinds(conf, []) == {}
    with pytest.raises(ConfigError, match="listed more than once"):
        registry.load_kinds(conf, ["a", "a"])
    with pytest.raises(ConfigError, match="unknown state kind in \\[state\\] kinds: nope"):
        registry.load_kinds(conf, ["nope"])


def test_a_peer_without_a_url_is_a_configuration_error(site: Site) -> None:
    h2 = site.host("h2")
    with pytest.raises(ConfigError, match="add h9:<url> to \\[state\\] peers"):
        h2.peer("h9")


# -------------------------------------------------------------------- TLS


def test_mutual_tls_between_hosts(site: Site, pki: Callable[[str], TlsFiles]) -> None:
    h1 = site.host("h1", tls=pki("h1"))
    h2 = site.host("h2", tls=pki("h2"))
    assert h1.url.startswith("https://")
    site.kernel.add("ns-h1", "fake", VIF, 1)
    h1.expect(MIG)
    precopy(site, h2)
    assert vm_entries(site, "h2") == [1]
    ca = h1.settings.tls.ca if h1.settings.tls else ""
    with pytest.raises(requests.exceptions.RequestException):  # no client certificate
        requests.get(f"{h1.url}/v1/health", headers={"X-Auth-Token": TOKEN}, verify=ca, timeout=5)
