"""The OVN lab (central node and three chassis in namespaces, OVS userspace
datapath), its demo (`vmm lab demo --backend ovn`) and its state demo."""
