#!/bin/bash
# Unpack Debian's exim4-daemon-heavy into /opt/exim4-heavy without installing the package:
# it conflicts with postfix (both provide mail-transport-agent).  Idempotent; run as root.
# Used by the daemon's Exim tests (readsocket) and the Exim plugin tests.
set -euo pipefail
PREFIX=${EXIM_PREFIX:-/opt/exim4-heavy}
export DEBIAN_FRONTEND=noninteractive

# The binary has user Debian-exim compiled in.
if ! id Debian-exim >/dev/null 2>&1; then
    adduser --system --group --allow-bad-names --home /var/spool/exim4 --no-create-home --quiet Debian-exim
fi

version=$("$PREFIX/usr/sbin/exim4" -bV 2>/dev/null || true)
if [[ "$version" == "Exim version"* ]]; then
    echo "install-exim: $PREFIX/usr/sbin/exim4 already works"
else
    if [ -z "$(ls -A /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial || true)" ]; then
        apt-get update -q
    fi
    # Exim's runtime libraries, without upgrading what is already installed.
    apt-get install -y -q --no-install-recommends --no-upgrade \
        libdb5.3 libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libldap-2.5-0 libmariadb3 \
        libnsl2 libpam0g libpcre2-8-0 libperl5.36 libpq5 libsasl2-2 libspf2-2 libsqlite3-0 \
        libcrypt1 adduser
    d=$(mktemp -d)
    chmod 755 "$d"
    (cd "$d" && apt-get download exim4-daemon-heavy 2>&1 | grep -v "unsandboxed" || true)
    ls "$d"/exim4-daemon-heavy_*.deb >/dev/null
    mkdir -p "$PREFIX"
    dpkg-deb -x "$d"/exim4-daemon-heavy_*.deb "$PREFIX"
    rm -rf "$d"
    # exim4 -bV exits 1 when no configuration exists yet (a fresh machine): judge its output,
    # not its status.
    version=$("$PREFIX/usr/sbin/exim4" -bV 2>/dev/null || true)
    if [[ "$version" != "Exim version"* ]]; then
        echo "install-exim: $PREFIX/usr/sbin/exim4 -bV does not run:" >&2
        "$PREFIX/usr/sbin/exim4" -bV >&2 || true
        exit 1
    fi
    echo "install-exim: ${version%%$'\n'*}"
fi

# -C configs must be listed here or Exim drops privilege; tests append their own paths.
mkdir -p /etc/exim4
touch /etc/exim4/trusted_configs
chown root:root /etc/exim4/trusted_configs
chmod 0644 /etc/exim4/trusted_configs
echo "install-exim: ok ($PREFIX/usr/sbin/exim4)"
