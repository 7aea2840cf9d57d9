"""The directory (NVA), the journal and per-migration leases on etcd.

When a site outgrows one ``vmm nva serve`` process, the directory lives in
an etcd cluster instead: the same semantics as the embedded SQLite store
(:class:`vmm_etcd.store.EtcdNvaStore`), NVE agents that watch their VNs'
key prefixes in etcd directly (:class:`vmm_etcd.client.EtcdNvaClient`), and
orchestrator instances that share an etcd journal and lease each migration
so that exactly one of them handles it (:mod:`vmm_etcd.ha`).
"""
