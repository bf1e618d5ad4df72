#!/bin/sh
# Legacy name of `torroute exim setup` / `torroute exim remove` (docs/exim.rst): installs (or
# --uninstall removes) torroute's Exim router, transport and macros in Debian's exim4
# configuration, split (conf.d) or non-split (exim4.conf.template), and torroute.pl, with the
# same backup, state and refusal rules.  As before, it does not run update-exim4.conf:
# run update-exim4.conf, test with exim -bt, then reload (or use `torroute exim setup`).
#
#   install-debian.sh [--confdir /etc/exim4] [--perl-dir DIR] [--split|--non-split] [--uninstall]
#
# --split / --non-split: default from dc_use_split_config in CONFDIR/update-exim4.conf.conf.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
action=setup
set --  "$@" --end-of-args
while [ "$1" != --end-of-args ]; do
    case "$1" in
        --uninstall) action=remove; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        --confdir|--perl-dir) set -- "$@" "$1" "$2"; shift 2 ;;
        --split|--non-split) set -- "$@" "$1"; shift ;;
        *) echo "install-debian.sh: unknown argument $1" >&2; exit 64 ;;
    esac
done
shift  # --end-of-args

# The code next to these files in a source tree; else $TORROUTE, else torroute on PATH.
if [ -n "${TORROUTE:-}" ]; then
    exec "$TORROUTE" exim "$action" --plugin-dir "$here" --no-update "$@"
elif [ -f "$here/../../torroute/cli/exim.py" ]; then
    PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}" exec /usr/bin/python3 -m torroute.cli \
        exim "$action" --plugin-dir "$here" --no-update "$@"
fi
exec torroute exim "$action" --plugin-dir "$here" --no-update "$@"
