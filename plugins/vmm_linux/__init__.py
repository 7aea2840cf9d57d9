"""Linux plugins: the NVE (bridge + VXLAN through pyroute2), the host-side
announcer, the Linux stages and the network-namespace lab."""
