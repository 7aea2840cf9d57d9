"""Kernel access shared by the Linux plugins: not a plugin itself.

One way into a host's network namespace (:mod:`vmm_kernel.netns`: a thread
steps in with setns(2), or a tool runs under ``ip netns exec``) and one
nftables transaction path (:mod:`vmm_kernel.nft`: libnftables in-process).
The Linux NVE, the NVE agent's address guard, every state kind and the OVN
host use these instead of each carrying its own copy; it registers no entry
point, so plugins still talk to each other only through the core's
contracts.
"""
