"""libvirt plugins: the event source (libvirt events -> migration phases, with
reconnection and reconciliation), the per-host daemon `vmm agent`, the hook
relay's endpoint, domain discovery, directory-based migration resolution and
the guest-agent / QMP announcers."""
