"""vmm-orchestrator: make the network follow a live-migrating VM.

The core package holds the model, the pipeline engine, the journal, the
embedded directory (NVA) and the command line. It imports no libvirt, Linux,
OpenStack or etcd code: those live in the plugin packages under plugins/.
"""

__version__ = "0.1.0"
