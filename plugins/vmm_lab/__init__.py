"""The labs, demos and benchmarks' building blocks: not product code.

Everything here is a client of the product's composition root
(:mod:`vmm_orchestrator.agent`): the labs write a configuration and get
their hosts from it, in-process or as ``vmm agent`` processes, so that what
a lab proves is what an operator runs. A production install needs none of
it; its options (``[lab]``) are not in the product's sample configuration.

* :mod:`vmm_lab.linux`: the namespace lab (underlay, hosts, VMs as
  namespaces), the probe streams and ``vmm lab demo``.
* :mod:`vmm_lab.libvirt`: real libvirtd hosts in the lab's namespaces and a
  tiny TCG guest.
* :mod:`vmm_lab.firewall`, :mod:`vmm_lab.proofs`, :mod:`vmm_lab.state_demo`:
  the model stateful firewall whose state the state kinds move, and
  ``vmm lab state-demo``.
"""
