#!/bin/sh
# The QubesDB unit tests against Qubes' own client library, Python module and qubesdb-read, built
# here from a qubes-core-qubesdb checkout, instead of the stand-ins: what the stand-in module claims
# of the library is checked against the library itself. Only the daemon stays a stand-in (the real
# one needs dom0 on a vchan); it serves at the real, fixed socket path /var/run/qubes/qubesdb.sock,
# inside a private mount namespace with a tmpfs on /run, so the host's /run is never touched. Root.
#
#   tests/qubesdb_real/run.sh /path/to/qubes-core-qubesdb [PYTEST ARGS...]
#
# One test is left out: it counts the runs the fake qubesdb-read logs, which the real one does not.
set -eu
src=$(cd "$1" && pwd)
shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -O2 -shared -fPIC -I"$src/include" -I"$inc" "$src/python/qubesdb.c" "$src/client/qdb-client.c" \
    -o "$build/qubesdb$suffix"
gcc -O2 -I"$src/include" "$src/client/qubesdb-cmd.c" "$src/client/qdb-client.c" -o "$build/qubesdb-read"
cd "$repo"
export QUBESDB_REAL_BUILD="$build" PYTHONPATH="$here"
unshare -m sh -ec 'mount -t tmpfs tmpfs /run; mkdir /run/qubes; py=$1; shift; exec "$py" -m pytest -q \
    -p no:cacheprovider -p real_library tests/unit/test_qubesdb.py tests/unit/test_qubesdb_watch.py \
    --deselect tests/unit/test_qubesdb.py::test_an_online_event_through_qubesdb_read_runs_it_once_for_every_key "$@"' \
    sh "$py" "$@"
