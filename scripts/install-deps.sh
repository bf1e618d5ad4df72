#!/bin/bash
# Install what torroute, its demo and its tests need on Debian 12 (bookworm), as root.
# Idempotent: re-running skips what is already there.  Used by ./demo, scripts/test and .ci/run.
#   - Debian packages: tor, dnsmasq-base, postfix (no configuration), swaks, torsocks, python3-venv,
#     neomutt (the mail client the `torroute send` tests drive in batch mode), prometheus (its
#     promtool checks the metrics exposition and the shipped alert rules), tinycdb (the cdb
#     tables of `torroute map transport`)
#   - a venv at /opt/torroute (Debian's python3; world-readable, so Postfix's pipe user can run
#     /opt/torroute/bin/torroute) with torroute and its test/docs extras
#   - Exim (exim4-daemon-heavy) unpacked into /opt/exim4-heavy (it conflicts with postfix) and
#     Debian's exim4-config unpacked into /opt/exim4-config (scripts/install-exim.sh)
# Prefixes: TORROUTE_VENV, EXIM_PREFIX, EXIM_CONFIG_PREFIX.  CI (scripts/fresh-debian-check)
# checks that it works the first time: into empty prefixes, and in a fresh Debian 12 chroot.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${TORROUTE_VENV:-/opt/torroute}
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (apt-get, /opt)" >&2
    exit 77
fi

# Never let a package start a system tor with Debian's default torrc: that tor would contact the
# public Tor network.  policy-rc.d (exit 101) makes invoke-rc.d skip service starts.
if [ ! -x /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    echo "install-deps: created /usr/sbin/policy-rc.d (no service starts during installs)"
fi

packages="tor dnsmasq-base postfix swaks torsocks python3-venv python3-dev iproute2 util-linux
          perl ca-certificates openssl unbound nsd ldnsutils neomutt tinycdb
          groff-base prometheus"
missing=""
for p in $packages; do
    # no pipe into grep -q: under pipefail an early-exiting grep can fail the pipeline
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ "$status" == *" ok installed" ]] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: apt-get install$missing"
    apt-get update -q
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get install -y -q --no-install-recommends $missing
fi
# Exim unpacked in $EXIM_PREFIX and Debian's exim4-config in $EXIM_CONFIG_PREFIX
bash "$here/scripts/install-exim.sh"

if [ ! -x "$VENV/bin/python" ]; then
    /usr/bin/python3 -m venv "$VENV"
fi
pip_args=(-q --disable-pip-version-check)
if [ "${TORROUTE_EDITABLE:-0}" = 1 ]; then
    "$VENV/bin/pip" install "${pip_args[@]}" -e "$here[test,docs,testnet,fast]"
else
    # from a clean copy: pip builds in the source directory, and a build/ left there by an
    # earlier run keeps modules since deleted from the tree (it also breaks a read-only tree)
    src=$(mktemp -d)
    tar -C "$here" --exclude-vcs --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache \
        --exclude=.hypothesis --exclude=./docs/_build -c . | tar -C "$src" -x
    "$VENV/bin/pip" install "${pip_args[@]}" "$src[test,docs,testnet,fast]"
    rm -rf "$src"
fi
chmod -R a+rX "$VENV"
echo "install-deps: ok ($VENV/bin/torroute $("$VENV/bin/torroute" --version | cut -d' ' -f2))"
