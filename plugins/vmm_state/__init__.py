"""State migration: the dynamic bridge and firewall state a VM built up on
its host (sessions, flood counters, blacklists, multicast membership,
802.1X-authorized MACs, DHCP-snooping bindings, MACsec associations) moves
with it, in signed bundles, with a SUCCESS/FAIL answer per kind."""
