#!/bin/bash
# Unpack Debian's exim4-daemon-heavy into /opt/exim4-heavy without installing the package:
# it conflicts with postfix (both provide mail-transport-agent).  Also unpack Debian's
# exim4-config (update-exim4.conf and the split/non-split templates) into /opt/exim4-config, for
# the Exim plugin's tests against Debian's real generated configuration.
# Idempotent; run as root.  Used by install-deps.sh (the daemon's and the Exim plugin's tests).
#   EXIM_PREFIX (default /opt/exim4-heavy), EXIM_CONFIG_PREFIX (default /opt/exim4-config)
# Works the first time on a fresh Debian 12: no apt lists yet, no adduser (minbase), no Exim
# configuration (exim4 -bV then exits 1), and the second time on an old machine (stale apt lists:
# a download that fails is retried once after apt-get update).
set -euo pipefail
PREFIX=${EXIM_PREFIX:-/opt/exim4-heavy}
CONFIG_PREFIX=${EXIM_CONFIG_PREFIX:-/opt/exim4-config}
export DEBIAN_FRONTEND=noninteractive

have_lists() {
    local lists
    lists=$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v -x -e lock -e partial -e auxfiles || true)
    [ -n "$lists" ]
}
# with_fresh_lists CMD...: run an apt-get command; when it fails (no or stale lists: 404s,
# "unable to locate package"), apt-get update and run it once more.
with_fresh_lists() {
    have_lists || apt-get update -q
    "$@" && return 0
    echo "install-exim: '$*' failed; refreshing the package lists and retrying" >&2
    apt-get update -q
    "$@"
}
# download PACKAGE DIR: the package's .deb into DIR (apt's unsandboxed-download note is noise)
download() {
    local out
    if ! out=$(cd "$2" && apt-get download "$1" 2>&1); then
        printf '%s\n' "$out" | grep -v "unsandboxed" >&2 || true
        return 1
    fi
    ls "$2/$1"_*.deb >/dev/null
}
unpack() {  # unpack PACKAGE PREFIX
    local d
    d=$(mktemp -d)
    chmod 755 "$d"  # apt's _apt user downloads into it
    with_fresh_lists download "$1" "$d" || { rm -rf "$d"; return 1; }
    mkdir -p "$2"
    dpkg-deb -x "$d/$1"_*.deb "$2"
    rm -rf "$d"
}

# The binary has user Debian-exim compiled in.  adduser is not in a minimal Debian.
if ! id Debian-exim >/dev/null 2>&1; then
    command -v adduser >/dev/null || with_fresh_lists apt-get install -y -q --no-install-recommends adduser
    adduser --system --group --allow-bad-names --home /var/spool/exim4 --no-create-home --quiet Debian-exim
fi

# exim4 -bV exits 1 when no configuration exists yet (a fresh machine): judge its output, not its
# status.
version=$("$PREFIX/usr/sbin/exim4" -bV 2>/dev/null || true)
if [[ "$version" == "Exim version"* ]]; then
    echo "install-exim: $PREFIX/usr/sbin/exim4 already works"
else
    # Exim's runtime libraries, without upgrading what is already installed.
    with_fresh_lists apt-get install -y -q --no-install-recommends --no-upgrade \
        libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libldap-2.5-0 libmariadb3 \
        libnsl2 libpam0g libpcre2-8-0 libperl5.36 libpq5 libsasl2-2 libspf2-2 libsqlite3-0 \
        libcrypt1
    unpack exim4-daemon-heavy "$PREFIX"
    version=$("$PREFIX/usr/sbin/exim4" -bV 2>/dev/null || true)
    if [[ "$version" != "Exim version"* ]]; then
        echo "install-exim: $PREFIX/usr/sbin/exim4 -bV does not run:" >&2
        "$PREFIX/usr/sbin/exim4" -bV >&2 || true
        exit 1
    fi
    echo "install-exim: ${version%%$'\n'*}"
fi

if [ ! -x "$CONFIG_PREFIX/usr/sbin/update-exim4.conf" ]; then
    unpack exim4-config "$CONFIG_PREFIX"
    echo "install-exim: exim4-config unpacked in $CONFIG_PREFIX"
fi

# -C configs must be listed here or Exim drops privilege; tests append their own paths.
mkdir -p /etc/exim4
touch /etc/exim4/trusted_configs
chown root:root /etc/exim4/trusted_configs
chmod 0644 /etc/exim4/trusted_configs
echo "install-exim: ok ($PREFIX/usr/sbin/exim4, $CONFIG_PREFIX/usr/sbin/update-exim4.conf)"
