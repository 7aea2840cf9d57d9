#!/bin/bash
# shellcheck source-path=SCRIPTDIR
#
# DevStack plugin of vmm-orchestrator: the network follows live-migrating VMs.
#
# stack.sh and unstack.sh/clean.sh source this file with the phase as arguments:
#   stack install      install the package in develop mode (setup_develop; its name is
#                      read from setup.cfg) and the libvirt hook relay
#   stack post-config  write /etc/vmm-orchestrator/vmm-orchestrator.conf and the relay's
#                      configuration, restart libvirtd so that it picks the relay up;
#                      the [neutron] service user for port bindings (Keystone user)
#   stack extra        start the services as DevStack units (devstack@vmm-nva, directory;
#                      devstack@vmm-agent, daemon)
#   unstack            stop and disable the services
#   clean              remove what the stack phases left: relay, configuration, data,
#                      units, the package
#
# Services (enable them in local.conf): vmm-agent on every compute host,
# vmm-nva on one host (the controller) when the embedded directory is used.

VMM_PLUGIN_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/vmm-orchestrator
source "$VMM_PLUGIN_DIR/lib/vmm-orchestrator"

if is_service_enabled vmm-agent vmm-nva; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        echo_summary "Installing vmm-orchestrator"
        install_vmm_orchestrator
    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        echo_summary "Configuring vmm-orchestrator"
        configure_vmm_orchestrator
    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        echo_summary "Starting vmm-orchestrator"
        start_vmm_orchestrator
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_vmm_orchestrator
    fi

    if [[ "$1" == "clean" ]]; then
        cleanup_vmm_orchestrator
    fi
fi
