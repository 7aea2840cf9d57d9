"""OVN/OVS hosts: the network follows a migrating VM on OpenStack's default backend.

* :mod:`vmm_ovn.host`: the HostDriver of one chassis (entry point ``ovn``):
  its NVE driver (:mod:`vmm_ovn.nve`) with the flows-installed barrier and
  its announcers (:mod:`vmm_ovn.announce`) that inject frames as if from the
  VM's own OVS port (OpenFlow packet-out, :mod:`vmm_ovn.openflow`).
* :mod:`vmm_ovn.directory`: OVN Northbound as the directory for OVN without
  Neutron (multi-chassis prestage, commit, abort, per-chassis convergence).
* :mod:`vmm_ovn.lab` and :mod:`vmm_ovn.demo`: a real OVN lab in network
  namespaces (OVS userspace datapath) and the side-by-side demo.
"""
