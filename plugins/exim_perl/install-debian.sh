#!/bin/sh
# Install (or --uninstall) torroute's Exim router, transport and macros into Debian's exim4
# configuration, split (conf.d) or non-split (exim4.conf.template), and torroute.pl.
# It only copies files and adds/removes marked .include lines; it does not regenerate or
# reload Exim: run update-exim4.conf, test with exim -bt, then reload (see README.md).
#
#   install-debian.sh [--confdir /etc/exim4] [--perl-dir DIR] [--split|--non-split] [--uninstall]
#
# --split / --non-split: default from dc_use_split_config in CONFDIR/update-exim4.conf.conf.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
confdir=/etc/exim4
perldir=/usr/local/share/torroute/exim
mode=
action=install
while [ $# -gt 0 ]; do
    case "$1" in
        --confdir) confdir=$2; shift 2 ;;
        --perl-dir) perldir=$2; shift 2 ;;
        --split) mode=split; shift ;;
        --non-split) mode=nonsplit; shift ;;
        --uninstall) action=uninstall; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "install-debian.sh: unknown argument $1" >&2; exit 64 ;;
    esac
done

if [ -z "$mode" ]; then
    mode=nonsplit
    if [ -r "$confdir/update-exim4.conf.conf" ] &&
       grep -Eq "^dc_use_split_config=['\"]?true" "$confdir/update-exim4.conf.conf"; then
        mode=split
    fi
fi

# Every line added to the non-split template follows a marker comment line (Exim allows no
# trailing comments on .include lines), so --uninstall removes exactly those pairs.
MARK="# torroute (install-debian.sh) added the next line"
template="$confdir/exim4.conf.template"

remove_marked() {  # drop the lines this script added to the non-split template
    [ -f "$template" ] || return 0
    if grep -qxF "$MARK" "$template"; then
        awk -v mark="$MARK" '$0 == mark { skip = 1; next } skip { skip = 0; next } { print }' \
            "$template" > "$template.torroute-tmp"
        cat "$template.torroute-tmp" > "$template"   # keep owner and mode
        rm -f "$template.torroute-tmp"
    fi
}

if [ "$action" = uninstall ]; then
    rm -f "$confdir/conf.d/main/01_torroute_macros" "$confdir/conf.d/router/190_torroute" \
          "$confdir/conf.d/transport/30_torroute"
    rm -rf "$confdir/torroute"
    remove_marked
    rm -f "$perldir/torroute.pl"
    rmdir "$perldir" 2>/dev/null || true
    echo "torroute removed from $confdir; now run update-exim4.conf and reload exim4"
    exit 0
fi

install -d -m 0755 "$perldir"
install -m 0644 "$here/torroute.pl" "$perldir/torroute.pl"

if [ "$mode" = split ]; then
    install -m 0644 "$here/conf.d/main/01_torroute_macros" "$confdir/conf.d/main/"
    install -m 0644 "$here/conf.d/router/190_torroute" "$confdir/conf.d/router/"
    install -m 0644 "$here/conf.d/transport/30_torroute" "$confdir/conf.d/transport/"
else
    [ -f "$template" ] || { echo "install-debian.sh: no $template" >&2; exit 78; }
    install -d -m 0755 "$confdir/torroute"
    install -m 0644 "$here/conf.d/main/01_torroute_macros" "$here/conf.d/router/190_torroute" \
        "$here/conf.d/transport/30_torroute" "$confdir/torroute/"
    remove_marked  # idempotent: re-insert at the documented places
    awk -v mark="$MARK" -v dir="$confdir/torroute" '
        NR == 1 { print mark; print ".include " dir "/01_torroute_macros" }
        /^### router\/200_exim4-config_primary/ && !r {
            print mark; print ".include " dir "/190_torroute"; r = 1 }
        { print }
        /^begin transports/ && !t { print mark; print ".include " dir "/30_torroute"; t = 1 }
        END { if (!r || !t) exit 1 }
    ' "$template" > "$template.torroute-tmp" || {
        rm -f "$template.torroute-tmp"
        echo "install-debian.sh: $template has no router/200_exim4-config_primary or" \
             "begin transports line; add the three .include lines by hand (README.md)" >&2
        exit 78
    }
    cat "$template.torroute-tmp" > "$template"
    rm -f "$template.torroute-tmp"
fi
echo "torroute installed into $confdir ($mode config); torroute.pl in $perldir"
echo "next: update-exim4.conf && exim -bt user@some.onion-routed.domain && systemctl reload exim4"
