"""Where the Linux plugin steps into a host's namespace: :mod:`vmm_kernel.netns`."""

from vmm_kernel.netns import NETNS_RUN_DIR, entered, socket_in

__all__ = ["NETNS_RUN_DIR", "entered", "socket_in"]
