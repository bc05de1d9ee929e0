#!/usr/bin/env bash
# Install everything probe needs on a Debian machine, as root. Idempotent:
# a second run only checks. Called by `make setup` (and so by `make run`,
# `make test` and `.ci/run`).
set -euo pipefail

VENV=${VENV:-.venv}
KERNEL=$(uname -r)
DEBIAN_PACKAGES=(
    python3-bpfcc python3-venv python3-dev   # the real bcc, a venv that sees it, headers
    gcc                                      # ... and a C compiler for the compiled hot path
    iproute2 procps                          # ip netns for tests, ps/pkill
    nginx curl golang-go openssl             # real servers and clients for tests
    wrk hey nghttp2-client                   # load generators for `make bench`
    valgrind                                 # bench.instructions: instructions per request
    bpftool                                  # bench.programs: the BPF programs' names
)

say() { printf 'setup: %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
    say "must run as root (it installs Debian packages and kernel headers)"
    exit 1
fi

# Node.js (a service in the trace tests and the demo) usually comes with the
# machine; Debian's package stands in where it does not.
command -v node >/dev/null || DEBIAN_PACKAGES+=(nodejs)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}
if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update_once
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx is installed for tests, which start their own instances: the
# package's default site must not hold port 80 on the host.
if systemctl is-enabled nginx >/dev/null 2>&1; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi

# Kernel headers: bcc compiles the BPF C at run time against them.
# Debian splits them: `build` holds the generated, flavour-specific part and
# `source` the common tree (where include/linux/kconfig.h lives).
if [[ ! -e /lib/modules/$KERNEL/build/Makefile || ! -e /lib/modules/$KERNEL/source/include/linux/kconfig.h ]]; then
    apt_update_once
    if apt-cache show "linux-headers-$KERNEL" >/dev/null 2>&1; then
        say "installing linux-headers-$KERNEL"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$KERNEL" >/dev/null
    else
        # No package for this kernel: take the newest packaged headers whose
        # version is not above the running kernel's (else the oldest one).
        # This works because probe's BPF code reads only tracepoint
        # arguments and user memory, never kernel-internal structs.
        flavour=cloud-amd64
        mapfile -t candidates < <(apt-cache search --names-only "^linux-headers-[0-9.]+-?.*-$flavour\$" \
            | awk '{print $1}' | sed "s/^linux-headers-//" | sort -V)
        if [[ ${#candidates[@]} -eq 0 ]]; then
            say "no kernel headers package found for $KERNEL; bcc cannot compile BPF programs"
            exit 1
        fi
        chosen=""
        for version in "${candidates[@]}"; do
            if [[ $(printf '%s\n%s\n' "$version" "$KERNEL" | sort -V | head -1) == "$version" ]]; then
                chosen=$version
            fi
        done
        chosen=${chosen:-${candidates[0]}}
        say "WARNING: no headers package for kernel $KERNEL; using linux-headers-$chosen instead"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$chosen" >/dev/null
        mkdir -p "/lib/modules/$KERNEL"
        ln -sfn "$(readlink -f "/lib/modules/$chosen/build")" "/lib/modules/$KERNEL/build"
        ln -sfn "$(readlink -f "/lib/modules/$chosen/source")" "/lib/modules/$KERNEL/source"
    fi
fi

# A venv from Debian's python, so Debian's bcc stays importable.
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import bcc" 2>/dev/null; then
    say "creating $VENV (from /usr/bin/python3, with system site-packages for bcc)"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp=$VENV/.installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    say "installing probe and its Python dependencies into $VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e '.[test,compile]'
    touch "$stamp"
fi
# The hot path as C extensions (probe/compiled.py): a no-op when current.
# Without them probe runs from source, at about twice the CPU.
"$VENV/bin/python" scripts/compile.py || say "WARNING: the hot path was not compiled; probe runs from source"
touch "$stamp"  # make's mark that this script, as it is now, has run
say "ready: $VENV/bin/probe"
