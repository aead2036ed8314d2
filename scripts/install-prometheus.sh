#!/usr/bin/env bash
# Installs Prometheus and the Pushgateway for the observability tests
# (tests/support/prometheus.py) from Debian bookworm's packages:
#   - prometheus 2.42 (also ships promtool);
#   - prometheus-pushgateway 1.5.
#
# The packages' maintainer scripts would start both as services. The tests
# start their own instances on free loopback ports, so this script blocks
# service starts while installing (a temporary /usr/sbin/policy-rc.d) and
# afterwards stops any instance of these binaries still listening on the
# default ports 9090 and 9091. A second run installs nothing and only prints
# the binary paths.
#
# Prints, one per line on stdout: the paths of prometheus, promtool and
# prometheus-pushgateway. Needs root (apt-get) and reaches only Debian's
# archive.
set -euo pipefail

log() { printf '[install-prometheus] %s\n' "$*" >&2; }

PACKAGES=(prometheus prometheus-pushgateway)
BINARIES=(prometheus promtool prometheus-pushgateway)
DEFAULT_PORTS=(9090 9091)

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            printf '%s\n' "$pkg"
        fi
    done
}

# invoke-rc.d runs /usr/sbin/policy-rc.d before starting a service, and exit code
# 101 from it blocks the start. An existing policy file is kept as it is.
install_without_starting() {
    local policy=/usr/sbin/policy-rc.d
    local created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created=1
    fi

    local status=0
    if ! apt-cache policy "$@" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        log "apt-get update"
        apt-get update -qq || status=$?
    fi
    if [ "$status" -eq 0 ]; then
        log "apt-get install $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    fi
    if [ "$created" -eq 1 ]; then
        rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        log "installing $* failed (exit code $status); see the apt-get output above"
        exit "$status"
    fi
}

# Stop an instance of our binaries that a maintainer script started anyway.
# Only processes whose executable is one of the installed binaries are
# signalled, found by the port they listen on.
stop_default_instances() {
    local port pid exe
    for port in "${DEFAULT_PORTS[@]}"; do
        for pid in $(listening_pids "$port"); do
            exe="$(readlink -f "/proc/$pid/exe" 2>/dev/null || true)"
            case "$exe" in
                */bin/prometheus|*/bin/prometheus-pushgateway)
                    log "stopping $exe (pid $pid) listening on port $port"
                    kill "$pid" 2>/dev/null || true
                    ;;
                "")
                    ;;
                *)
                    log "port $port is in use by $exe (pid $pid); leaving it alone"
                    ;;
            esac
        done
    done
}

# PIDs of processes with a TCP socket listening on PORT, read from /proc so
# the script needs neither ss nor lsof.
listening_pids() {
    local port="$1" hex inodes inode fd pid
    hex="$(printf '%04X' "$port")"
    inodes="$(awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {print $10}' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u)"
    [ -n "$inodes" ] || return 0
    for fd in /proc/[0-9]*/fd/*; do
        inode="$(readlink "$fd" 2>/dev/null || true)"
        case "$inode" in
            socket:\[*\])
                inode="${inode#socket:[}"
                inode="${inode%]}"
                if printf '%s\n' "$inodes" | grep -qx "$inode"; then
                    pid="${fd#/proc/}"
                    printf '%s\n' "${pid%%/*}"
                fi
                ;;
        esac
    done | sort -u
}

main() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" -gt 0 ]; then
        install_without_starting "${missing[@]}"
    fi
    stop_default_instances

    local binary path
    for binary in "${BINARIES[@]}"; do
        if ! path="$(command -v "$binary")"; then
            log "$binary is not on PATH after installing ${PACKAGES[*]}; check 'dpkg -L prometheus prometheus-pushgateway'"
            exit 1
        fi
        printf '%s\n' "$path"
    done
}

main "$@"
