#!/bin/bash
#
# A stand-in for the DevStack functions devstack/plugin.sh calls. This machine
# runs no DevStack; tests/unit/test_devstack_plugin.py sources this file, then
# devstack/settings and devstack/plugin.sh with each phase's arguments, as
# stack.sh, unstack.sh and clean.sh do.
#
# Every function appends one line to $DEVSTACK_CALLS: its name and arguments,
# separated by tabs, so the test can assert what was asked of DevStack. Where
# the test must see the effect on the host (iniset writing a file, sudo running
# install or rm), the stand-in does it for real, below $FAKE_ROOT paths that the
# test passes in the VMM_* variables. Processes are never started.

: "${DEVSTACK_CALLS:?the test sets DEVSTACK_CALLS}"
: "${FAKE_BIN_DIR:?the test sets FAKE_BIN_DIR}"

function _record {
    local IFS=$'\t'
    printf '%s\n' "$*" >>"$DEVSTACK_CALLS"
}

# As DevStack's: true when any of the services is in ENABLED_SERVICES.
function is_service_enabled {
    local service
    for service in "$@"; do
        if [[ ",${ENABLED_SERVICES}," == *",${service},"* ]]; then
            return 0
        fi
    done
    return 1
}

function define_plugin {
    _record define_plugin "$@"
}

function echo_summary {
    _record echo_summary "$@"
}

function setup_develop {
    _record setup_develop "$@"
}

function pip_install_gr {
    _record pip_install_gr "$@"
}

function run_process {
    _record run_process "$@"
}

function stop_process {
    _record stop_process "$@"
}

function restart_service {
    _record restart_service "$@"
}

function get_python_exec_prefix {
    echo "$FAKE_BIN_DIR"
}

# As DevStack's: message on stderr, exit non-zero.
function die {
    local line=$1
    shift
    echo "[ERROR] plugin line $line: $*" >&2
    _record die "$@"
    exit 1
}

# Runs the command for real (the test's paths are temporary) and records it.
function sudo {
    _record sudo "$@"
    "$@"
}

# As DevStack's iniset [-sudo] FILE SECTION OPTION VALUE: set one option, keep the rest.
function iniset {
    _record iniset "$@"
    if [[ "$1" == "-sudo" ]]; then
        shift
    fi
    python3 -I -S - "$@" <<'PY'
import configparser, os, sys

path, section, option, value = sys.argv[1:5]
parser = configparser.ConfigParser(interpolation=None)
parser.optionxform = str
if os.path.exists(path):
    parser.read(path)
if not parser.has_section(section) and section != "DEFAULT":
    parser.add_section(section)
parser.set(section, option, value)
with open(path, "w") as fh:
    parser.write(fh)
PY
}
