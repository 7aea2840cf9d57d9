"""OpenStack plugin: `vmm migrate-with-network` and Neutron port bindings as the directory.

* ``command``: the `vmm migrate-with-network` command (Nova, or plain libvirt);
* ``neutron``: ``NeutronDirectory``, the NVA role on Neutron port bindings,
  also loadable by per-host agents as the ``neutron`` NVA backend;
* ``nova`` / ``libvirt_driver``: the drivers that move the VM;
* ``migrate``: the flow (resolve, prestage, migrate, commit, converge);
* ``progress``: the live display; ``options``: ``[openstack]``.

openstacksdk and libvirt are imported only when a command needs them.
"""
