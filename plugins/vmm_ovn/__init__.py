"""OVN/OVS hosts: the network follows a migrating VM on OpenStack's default backend.

* :mod:`vmm_ovn.host`: the HostDriver of one chassis (entry point ``ovn``):
  the chassis view with the flows-installed barrier (:mod:`vmm_ovn.chassis`),
  its NVE driver (:mod:`vmm_ovn.nve`: what each NVE call means on OVN) and
  its announcers (:mod:`vmm_ovn.announce`) that inject frames as if from the
  VM's own OVS port (OpenFlow packet-out, :mod:`vmm_ovn.openflow`).
* :mod:`vmm_ovn.directory`: OVN Northbound as the directory for OVN without
  Neutron (multi-chassis prestage, switch at pause, commit, abort,
  duplicate-address check, per-chassis convergence).
* :mod:`vmm_ovn.stages`: ``ovn_convergence``, per-chassis convergence when
  Neutron writes the Northbound (the plugin then only reads OVN).
* :mod:`vmm_ovn.conntrack` and :mod:`vmm_ovn.state`: the ``ovn_conntrack``
  state kind, moving a VM's security-group sessions between the chassis'
  conntrack zones on the userspace datapath.
* :mod:`vmm_ovn.options`: the ``[ovn]`` group.
* :mod:`vmm_lab.ovn.lab`, :mod:`vmm_lab.ovn.demo`, :mod:`vmm_lab.ovn.state_demo`: a real
  OVN lab in network namespaces (OVS userspace datapath) and the demos.
"""
