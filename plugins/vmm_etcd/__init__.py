"""The directory (NVA), the journal and per-migration leases on etcd.

When a site outgrows one ``vmm nva serve`` process, the directory lives in
an etcd cluster instead: the same semantics as the embedded SQLite store
(:class:`vmm_etcd.store.EtcdNvaStore`), NVE agents that watch their VNs'
key prefixes in etcd directly (:class:`vmm_etcd.client.EtcdNvaClient`), and
orchestrator instances that share an etcd journal and lease each migration
so that exactly one of them handles it (:mod:`vmm_etcd.ha`).

At scale (issue 16) ``vmm nva serve`` runs in front of etcd (backend
``etcd-served``): each server follows the change log with one etcd watch
(:mod:`vmm_etcd.feed`) and streams it to the NVE agents, so etcd holds one
watch per server instead of one per agent.
"""
