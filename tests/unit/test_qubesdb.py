"""QubesDB through Qubes' module (stand-in) and through ``qubesdb-read`` (fake), against a stand-in daemon.

The stand-in module (``tests/standin_qubesdb/qubesdb.py``) keeps the rules
of Qubes' library: one call at a time per connection, watch events queued
inside it during calls, no watches after its own reconnect; strict mode
fails a call made from a thread where SIGTERM can interrupt it. The
daemon (``tests/qubesdb_daemon.py``) keeps the real daemon's matching and
ordering. Nothing here needs root.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests import polling
from tests.qubesdb_daemon import StandinQubesDB, forget_standin
from tests.qubesdb_fixtures import (  # noqa: F401
    CONNECTED,
    GATEWAY,
    TIMEOUT,
    cache_fixture,
    daemon_fixture,
    module_fixture,
    qubesdb_read_fixture,
)
from tests.unit.fakes import FakeKernel, FakeXenStore
from tests.unit.test_hotplug import event, kernel, store
from vif_hotplug.core.netvm_params import Reader, resolve_connected, resolve_harden, resolve_mapped, resolve_params
from vif_hotplug.xen import qubesdb as qdb
from vif_hotplug.xen.qubesdb import (
    WATCHED,
    CommandReader,
    QubesDBCache,
    QubesDBError,
    SnapshotReader,
    read_with_command,
)


def runs(daemon: StandinQubesDB) -> list[str]:
    """The argv of every fake qubesdb-read run so far."""
    path = Path(daemon.path + ".runs")
    return path.read_text().splitlines() if path.exists() else []


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, failing the test (instead of hanging it) if it takes longer than ``seconds``."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed back below
            box.append((False, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"still waiting after {seconds}s"
    ok, value = box[0]
    if not ok:
        raise value
    return value


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    return polling.eventually(check, seconds, interval=0.01)


# --- the same parameters either way ---------------------------------------------------------------

RESOLVERS: dict[str, Callable[[Reader], object]] = {
    "netvm parameters": lambda r: resolve_params(None, r, None),
    "connected addresses": lambda r: resolve_connected(None, r, None),
    "mapping": lambda r: resolve_mapped(None, r, IPv4Address("10.137.0.50")),
    "hardening": lambda r: resolve_harden(None, r),
}


@pytest.mark.parametrize("what", sorted(RESOLVERS))
def test_the_module_and_qubesdb_read_give_the_same_values(cache: QubesDBCache, qubesdb_read: str, what: str) -> None:
    resolve = RESOLVERS[what]
    through_module = resolve(SnapshotReader(cache))
    assert through_module == resolve(CommandReader(qubesdb_read, TIMEOUT))
    assert through_module not in (None, False, ())


def test_a_value_with_bytes_outside_printable_ascii_reads_the_same_both_ways(
    daemon: StandinQubesDB, cache: QubesDBCache, qubesdb_read: str,
) -> None:
    daemon.write(GATEWAY, b"10.137.0.1\x01\xff")
    assert SnapshotReader(cache)(GATEWAY) == CommandReader(qubesdb_read)(GATEWAY) == "10.137.0.1\\x01\\xff"


def test_a_missing_key_reads_as_absent_both_ways(daemon: StandinQubesDB, cache: QubesDBCache,
                                                 qubesdb_read: str) -> None:
    daemon.rm("/qubes-netvm-gateway6")
    assert SnapshotReader(cache)("/qubes-netvm-gateway6") is None
    assert CommandReader(qubesdb_read)("/qubes-netvm-gateway6") is None


def test_a_key_this_package_does_not_watch_is_refused(cache: QubesDBCache) -> None:
    with pytest.raises(ValueError, match="/name"):
        SnapshotReader(cache)("/name")


# --- what an event costs ------------------------------------------------------------------------------


def test_an_online_event_through_qubesdb_read_runs_it_once_for_every_key(
    daemon: StandinQubesDB, qubesdb_read: str,
) -> None:
    outcome = event("online", store(), kernel(), qubesdb=CommandReader(qubesdb_read, TIMEOUT))
    assert outcome.exit_code == 0, outcome.error
    [argv] = runs(daemon)
    assert "/qubes-netvm-gateway" in argv.split() and "/mapped-ip/10.137.0.5/visible-ip" in argv.split()


def test_an_online_event_through_the_module_asks_qubesdb_nothing_when_nothing_changed(
    daemon: StandinQubesDB, cache: QubesDBCache,
) -> None:
    SnapshotReader(cache)(GATEWAY)
    before = daemon.requests
    outcome = event("online", store(), kernel(), qubesdb=SnapshotReader(cache))
    assert (outcome.exit_code, daemon.requests, runs(daemon)) == (0, before, [])


def test_an_online_event_takes_its_gateway_from_qubesdb_through_the_module(cache: QubesDBCache) -> None:
    k = kernel()
    event("online", store(), k, qubesdb=SnapshotReader(cache))
    assert "10.137.0.1/32" in k.addresses_of("vif4.0")


def test_reading_qubesdb_writes_nothing_to_it(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    reader = SnapshotReader(cache)
    resolve_params(None, reader, None)
    daemon.write(CONNECTED, "10.137.0.7")
    resolve_connected(None, SnapshotReader(cache), None)
    assert daemon.client_changes == []


# --- never older than the last watch event -----------------------------------------------------------


def test_a_change_is_seen_by_the_next_reader_at_once(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    SnapshotReader(cache)(GATEWAY)
    daemon.write(GATEWAY, "10.137.0.254")
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.254"


def test_one_reader_keeps_the_values_of_its_first_read(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    reader = SnapshotReader(cache)
    reader(GATEWAY)
    daemon.write("/qubes-netvm-primary-dns", "10.139.1.9")
    assert reader("/qubes-netvm-primary-dns") == "10.139.1.1"


def test_a_change_to_a_key_already_read_while_the_rest_is_read_is_not_missed(
    daemon: StandinQubesDB, cache: QubesDBCache,
) -> None:
    # The watch event reaches the library while it waits for a later answer of the
    # same pass: it is queued inside the library and the socket stays quiet.
    def meanwhile(kind: int, path: str) -> None:
        if path == "/connected-ips":
            daemon.on_request = None
            daemon.write(GATEWAY, "10.137.0.254")

    SnapshotReader(cache)(GATEWAY)
    daemon.on_request = meanwhile
    daemon.write(CONNECTED, "10.137.0.7")
    SnapshotReader(cache)(CONNECTED)
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.254"


def test_a_change_after_one_queued_inside_the_library_is_seen_too(daemon: StandinQubesDB,
                                                                   cache: QubesDBCache) -> None:
    def meanwhile(kind: int, path: str) -> None:
        if path == "/connected-ips":
            daemon.on_request = None
            daemon.write(GATEWAY, "10.137.0.254")

    SnapshotReader(cache)(GATEWAY)
    daemon.on_request = meanwhile
    daemon.write(CONNECTED, "10.137.0.7")
    SnapshotReader(cache)(CONNECTED)
    daemon.write(CONNECTED, "10.137.0.8")
    assert SnapshotReader(cache)(CONNECTED) == "10.137.0.8"


def test_a_new_qubes_ip_key_is_watched_once_seen(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    daemon.write("/qubes-ip-extra", "10.138.0.10")
    daemon.write(GATEWAY, "10.137.0.254")  # some watched change makes the agent read again
    SnapshotReader(cache)(GATEWAY)
    daemon.write("/qubes-ip-extra", "10.138.0.11")
    assert SnapshotReader(cache)("/qubes-ip-extra") == "10.138.0.11"


# --- the rules of Qubes' library --------------------------------------------------------------------


def test_readers_in_many_threads_never_make_two_calls_at_once(
    daemon: StandinQubesDB, module: ModuleType, cache: QubesDBCache,
) -> None:
    module.STRICT = False  # this one is about calls at once, whatever the signal masks
    daemon.delay = 0.002  # each answer takes a while: calls of two threads would overlap
    errors: list[BaseException] = []

    def reader_thread(n: int) -> None:
        try:
            for i in range(10):
                daemon.write(CONNECTED, f"10.137.{n}.{i + 2}")
                SnapshotReader(cache)(CONNECTED)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader_thread, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (module.VIOLATIONS, errors) == ([], [])


def test_calls_are_made_where_no_signal_can_interrupt_them(daemon: StandinQubesDB, module: ModuleType,
                                                            cache: QubesDBCache) -> None:
    # The test's own thread has SIGTERM unblocked; strict mode fails any call made from it.
    SnapshotReader(cache)(GATEWAY)
    daemon.write(GATEWAY, "10.137.0.254")
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.254"
    assert module.VIOLATIONS == []


def test_every_watched_key_is_watched_once(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    SnapshotReader(cache)(GATEWAY)
    assert daemon.watch_count() == len(WATCHED)


# --- a QubesDB that is gone, hangs or restarts -------------------------------------------------------


def test_a_qubesdb_that_cannot_be_reached_is_no_source(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    daemon.stop()
    params = resolve_params(None, SnapshotReader(cache), FakeXenStore({"qubes-netvm-gateway": "10.137.0.9"}).read)
    assert (str(params.gateway), params.source) == ("10.137.0.9", "XenStore")


def test_a_qubesdb_that_does_not_answer_is_a_one_line_error_within_the_deadline(
    daemon: StandinQubesDB, cache: QubesDBCache,
) -> None:
    SnapshotReader(cache)(GATEWAY)
    daemon.hang = True
    daemon.write(CONNECTED, "10.137.0.7")
    with pytest.raises(QubesDBError) as err:
        within(5 * TIMEOUT, lambda: SnapshotReader(cache)(CONNECTED))
    assert str(err.value) == f"QubesDB did not answer within {TIMEOUT:g}s"


def test_offline_with_a_qubesdb_that_does_not_answer_still_removes_the_vifs_state(
    daemon: StandinQubesDB, cache: QubesDBCache,
) -> None:
    xs, k = store(), kernel()
    event("online", xs, k, qubesdb=SnapshotReader(cache))
    daemon.hang = True
    daemon.write(CONNECTED, "10.137.0.7")
    outcome = within(10 * TIMEOUT, lambda: event("offline", xs, k, qubesdb=SnapshotReader(cache)))
    assert (outcome.exit_code, k.elements_of("vif4.0"), k.routes_of("vif4.0")) == (0, set(), set())


def test_after_a_hang_qubesdb_is_read_anew_once_it_answers(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    SnapshotReader(cache)(GATEWAY)
    daemon.hang = True
    daemon.write(CONNECTED, "10.137.0.7")
    with pytest.raises(QubesDBError):
        within(5 * TIMEOUT, lambda: SnapshotReader(cache)(CONNECTED))
    daemon.hang = False
    assert within(5 * TIMEOUT, lambda: SnapshotReader(cache)(CONNECTED)) == "10.137.0.7"


def test_a_connect_that_does_not_answer_is_a_one_line_error(daemon: StandinQubesDB, module: ModuleType,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    stuck = threading.Event()
    real = module.QubesDB

    def connect() -> object:
        stuck.wait(30)
        return real()

    monkeypatch.setattr(module, "QubesDB", connect)
    c = QubesDBCache(module, timeout=TIMEOUT)
    try:
        with pytest.raises(QubesDBError, match="did not answer"):
            within(5 * TIMEOUT, c.snapshot)
    finally:
        stuck.set()
        c.close()


def test_after_the_daemon_restarts_changes_are_watched_again(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    SnapshotReader(cache)(GATEWAY)
    daemon.restart()
    daemon.write(GATEWAY, "10.137.0.254")
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.254"
    daemon.write(GATEWAY, "10.137.0.253")
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.253"
    assert daemon.watch_count() == len(WATCHED)


def test_qubesdb_comes_back_as_a_source_when_its_daemon_does(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    daemon.stop()
    assert SnapshotReader(cache)(GATEWAY) is None
    daemon.start()
    assert SnapshotReader(cache)(GATEWAY) == "10.137.0.1"


def test_qubesdb_read_that_does_not_answer_is_a_one_line_error(daemon: StandinQubesDB, qubesdb_read: str) -> None:
    daemon.hang = True
    with pytest.raises(QubesDBError) as err:
        within(10 * TIMEOUT, lambda: read_with_command(qubesdb_read, [GATEWAY], TIMEOUT))
    assert str(err.value) == f"qubesdb-read did not answer within {TIMEOUT:g}s"


def test_qubesdb_read_that_cannot_reach_qubesdb_reads_every_key_as_absent(daemon: StandinQubesDB,
                                                                          qubesdb_read: str) -> None:
    daemon.stop()
    assert read_with_command(qubesdb_read, [GATEWAY, CONNECTED]) == {GATEWAY: None, CONNECTED: None}


def test_qubesdb_read_that_is_gone_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(QubesDBError, match="cannot run"):
        read_with_command(str(tmp_path / "qubesdb-read"), [GATEWAY])


# --- which way a process reads ----------------------------------------------------------------------


def test_a_process_reads_through_the_module_when_it_imports(module: ModuleType, qubesdb_read: str) -> None:
    from vif_hotplug.app.runtime import Runtime
    from vif_hotplug.app.settings import Settings

    runtime = Runtime()
    try:
        assert isinstance(runtime.qubesdb(Settings(qubesdb_read=qubesdb_read)), SnapshotReader)
    finally:
        runtime.close()


def test_a_process_reads_through_qubesdb_read_without_the_module(qubesdb_read: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from vif_hotplug.app.runtime import Runtime
    from vif_hotplug.app.settings import Settings

    forget_standin()
    monkeypatch.setattr(qdb, "SYSTEM_SITE", "/nonexistent")
    runtime = Runtime()
    try:
        assert isinstance(runtime.qubesdb(Settings(qubesdb_read=qubesdb_read)), CommandReader)
        assert runtime.qubesdb(Settings()) is None
    finally:
        runtime.close()


# --- vif-hotplug connected-ips --watch ----------------------------------------------------------------


def test_connected_ips_watch_follows_qubesdb_without_a_timer(
    daemon: StandinQubesDB, cache: QubesDBCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    from vif_hotplug.app import connected
    from vif_hotplug.app.settings import Settings

    monkeypatch.setattr(connected, "WATCH_INTERVAL", 1000.0)  # a timer would never fire in this test
    k = FakeKernel(ipv6_in_kernel=False)
    k.init_firewall(ipv6=False)
    seen: list[bool] = []

    def change_then_stop() -> None:
        try:
            if eventually(lambda: {e.network for e in k.elements(4, "connected")} == {"10.137.0.5/32",
                                                                                      "10.137.0.6/32"}):
                daemon.write(CONNECTED, "10.137.0.9")
                seen.append(eventually(lambda: {e.network for e in k.elements(4, "connected")}
                                       == {"10.137.0.9/32"}))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(connected, "kernel_has_ipv6", lambda: False)
    helper = threading.Thread(target=change_then_stop)
    helper.start()
    code = connected.watch_connected(Settings(hotplug_lock=str(tmp_path / "lock")), k, SnapshotReader(cache),
                                     None)
    helper.join()
    assert (code, seen) == (0, [True])
