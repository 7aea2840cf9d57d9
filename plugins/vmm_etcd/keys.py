"""Where everything lives in etcd, under one configurable prefix.

One module owns the layout so the store, the agents' client, the journal
and the leases agree on it, and an operator can read it with etcdctl::

    <prefix>rev                         directory revision (20 digits)
    <prefix>nves/<nve>                  {"id", "vtep", "vnis"}
    <prefix>acks/<nve>                  "<acked revision, 20 digits>|<acked_at>" (single acks)
    <prefix>acklog/<writer>/<seq>       a batch of NVE acks (JSON, compressed when long;
                                        see vmm_etcd.acklog)
    <prefix>nvegen                      rewritten whenever an NVE record is written or deleted
    <prefix>ackgen                      rewritten whenever a single ack key is written or
                                        deleted (vmm_etcd.store)
    <prefix>eps/<vni, 8 digits>/<mac>   an endpoint (JSON)
    <prefix>ips/<vni, 8 digits>/<ip>    the MAC holding that address in the VN
    <prefix>chg/<vni, 8 digits>/<rev>   one change NVEs apply (JSON)
    <prefix>journal/<host>/<migration>  one migration's journal record (JSON)
    <prefix>owners/<host>/<migration>   the instance handling it (on its lease)

Numbers are zero-padded so that etcd's key order is numeric order (ranges
come back sorted by VNI, then MAC, and changes by revision) and so that
revisions compare correctly as strings inside transactions.
"""

from __future__ import annotations

import dataclasses

REVISION_DIGITS = 20


def pad(revision: int) -> str:
    """A revision as a fixed-width string: string order is numeric order."""
    return f"{revision:0{REVISION_DIGITS}d}"


def vni_key(vni: int) -> str:
    return f"{vni:08d}"


@dataclasses.dataclass(frozen=True)
class Keys:
    """Key names under ``prefix`` (which always ends with '/')."""

    prefix: str

    def __post_init__(self) -> None:
        fixed = "/" + self.prefix.strip("/") + "/" if self.prefix.strip("/") else "/"
        object.__setattr__(self, "prefix", fixed)

    # directory
    @property
    def revision(self) -> str:
        return f"{self.prefix}rev"

    @property
    def nves(self) -> str:
        return f"{self.prefix}nves/"

    def nve(self, nve_id: str) -> str:
        return f"{self.nves}{nve_id}"

    @property
    def acks(self) -> str:
        return f"{self.prefix}acks/"

    def ack(self, nve_id: str) -> str:
        return f"{self.acks}{nve_id}"

    @property
    def ack_log(self) -> str:
        return f"{self.prefix}acklog/"

    @property
    def any_ack(self) -> str:
        """The prefix of both ``acks/`` and ``acklog/`` (one watch follows every ack)."""
        return f"{self.prefix}ack"

    @property
    def nve_generation(self) -> str:
        return f"{self.prefix}nvegen"

    @property
    def endpoints(self) -> str:
        return f"{self.prefix}eps/"

    def vn_endpoints(self, vni: int) -> str:
        return f"{self.endpoints}{vni_key(vni)}/"

    def endpoint(self, vni: int, mac: str) -> str:
        return f"{self.vn_endpoints(vni)}{mac}"

    def address(self, vni: int, ip: str) -> str:
        return f"{self.prefix}ips/{vni_key(vni)}/{ip}"

    @property
    def changes(self) -> str:
        return f"{self.prefix}chg/"

    def vn_changes(self, vni: int) -> str:
        return f"{self.changes}{vni_key(vni)}/"

    def change(self, vni: int, revision: int) -> str:
        return f"{self.vn_changes(vni)}{pad(revision)}"

    # orchestrator
    def journal(self, host: str) -> str:
        return f"{self.prefix}journal/{host}/"

    def journal_entry(self, host: str, migration_id: str) -> str:
        return f"{self.journal(host)}{migration_id}"

    def owners(self, host: str) -> str:
        return f"{self.prefix}owners/{host}/"

    def owner(self, host: str, migration_id: str) -> str:
        return f"{self.owners(host)}{migration_id}"
