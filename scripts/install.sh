#!/usr/bin/env bash
# Install probe as a systemd service, or remove it (--uninstall). As root:
#   scripts/install.sh               venv + unit + config, then: systemctl enable --now probe
#   scripts/install.sh --uninstall   stops and removes them; keeps a config you edited
#
# Where things go (environment variables):
#   PREFIX     /opt/probe                 source in PREFIX/src, venv in PREFIX/venv
#   SYSCONFDIR /etc                       config in SYSCONFDIR/probe/probe.yaml
#   UNITDIR    /etc/systemd/system        probe.service
#   DESTDIR    (empty)                    staging root for packagers and tests: files go
#                                         under it, paths written into them do not include
#                                         it. With DESTDIR set, only the unit and config are
#                                         installed (a venv cannot move) and neither apt
#                                         nor systemctl is called.
set -euo pipefail

PREFIX=${PREFIX:-/opt/probe}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DESTDIR=${DESTDIR:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)

# The paths deploy/systemd/probe.service is written for.
DEFAULT_PREFIX=/opt/probe
DEFAULT_CONFIG_DIR=/etc/probe

unit=$DESTDIR$UNITDIR/probe.service
config_dir=$DESTDIR$SYSCONFDIR/probe
config=$config_dir/probe.yaml
example_config=$REPO/deploy/probe.yaml

say() { printf 'install: %s\n' "$*" >&2; }

live() { [[ -z $DESTDIR ]]; }

systemd_running() { live && [[ -d /run/systemd/system ]]; }

install_debian_packages() {
    local missing=() pkg
    for pkg in python3-bpfcc python3-venv gcc python3-dev; do  # gcc, headers: the compiled hot path
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    # bcc compiles against the running kernel's headers.
    if [[ ! -e /lib/modules/$(uname -r)/build ]]; then
        say "WARNING: no kernel headers in /lib/modules/$(uname -r)/build;" \
            "install linux-headers-$(uname -r), or run scripts/setup.sh, which finds a fallback"
    fi
}

install_venv() {
    # The source is kept beside the venv: bcc compiles bpf/*.c at run time,
    # so probe is installed in place (editable), as in the repository.
    say "copying the source to $PREFIX/src"
    rm -rf "$PREFIX/src"
    mkdir -p "$PREFIX/src"
    tar -C "$REPO" -cf - --exclude=./.git --exclude=./.venv --exclude=./tests \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude='.*_cache' --exclude=./.hypothesis . \
        | tar -C "$PREFIX/src" -xf -
    if [[ ! -x $PREFIX/venv/bin/python ]]; then
        say "creating $PREFIX/venv (Debian's python, with system site-packages for bcc)"
        /usr/bin/python3 -m venv --system-site-packages "$PREFIX/venv"
    fi
    say "installing probe into $PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q -e "$PREFIX/src[compile]"
    # The hot path as C extensions (probe/compiled.py): a no-op when the copy
    # came built; without a C compiler, probe runs from source.
    "$PREFIX/venv/bin/python" "$PREFIX/src/scripts/compile.py" \
        || say "WARNING: the hot path was not compiled (install gcc and python3-dev); probe runs from source"
}

install_files() {
    say "installing $unit"
    mkdir -p "$(dirname "$unit")"
    sed -e "s|$DEFAULT_PREFIX/|$PREFIX/|g" -e "s|$DEFAULT_CONFIG_DIR/|$SYSCONFDIR/probe/|g" \
        "$REPO/deploy/systemd/probe.service" >"$unit"
    chmod 0644 "$unit"
    if [[ -e $config ]]; then
        say "keeping $config"
    else
        say "installing $config"
        # 0600: the config may hold exporter headers with credentials.
        install -D -m 0600 "$example_config" "$config"
    fi
}

uninstall() {
    if systemd_running; then
        systemctl disable --now probe.service 2>/dev/null || true
    fi
    say "removing $unit"
    rm -f "$unit"
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [[ -e $config ]] && ! cmp -s "$config" "$example_config"; then
        say "keeping $config: it was edited"
    else
        rm -f "$config"
        rmdir "$config_dir" 2>/dev/null || true
    fi
    if live; then
        say "removing $PREFIX/src and $PREFIX/venv"
        rm -rf "$PREFIX/src" "$PREFIX/venv"
        rmdir "$PREFIX" 2>/dev/null || true
    fi
}

main() {
    local action=install
    case ${1:-} in
        "") ;;
        --uninstall) action=uninstall ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            return 0
            ;;
        *)
            say "unknown argument: $1 (see --help)"
            return 2
            ;;
    esac
    # uninstall runs rm -rf under PREFIX.
    if [[ $PREFIX != /?* ]]; then
        say "PREFIX must be an absolute path other than /, got '$PREFIX'"
        return 2
    fi
    if live && [[ $EUID -ne 0 ]]; then
        say "must run as root (or set DESTDIR to stage the files)"
        return 1
    fi
    if [[ $action == uninstall ]]; then
        uninstall
        return 0
    fi
    if live; then
        install_debian_packages
        install_venv
    fi
    install_files
    if systemd_running; then
        systemctl daemon-reload
        say "done. Set the exporter endpoint in $config, then: systemctl enable --now probe"
    elif live; then
        say "done. systemd is not running here: start $PREFIX/venv/bin/probe run --config $config"
    fi
}

main "$@"
