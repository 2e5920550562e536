"""The agent's QubesDB watcher (app.qubesdb_watch) against the stand-in daemon and a fake XenStore."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from tests.qubesdb_daemon import StandinQubesDB
from tests.qubesdb_fixtures import cache_fixture, daemon_fixture, module_fixture  # noqa: F401
from tests.unit.fakes import FakeXenStore
from vif_hotplug.app.qubesdb_watch import QubesDBWatcher
from vif_hotplug.xen.qubesdb import QubesDBCache, SnapshotReader

Asked = tuple[str, tuple[str, ...], dict[str, str], Callable[[], bool]]


class Agent:
    """What the watcher hands work to: records every request."""

    def __init__(self) -> None:
        self.asked: list[Asked] = []
        self.cond = threading.Condition()

    def submit(self, prog: str, argv: list[str], env: dict[str, str], still_wanted: Callable[[], bool]) -> None:
        with self.cond:
            self.asked.append((prog, tuple(argv), env, still_wanted))
            self.cond.notify_all()

    def wait_for(self, count: int, seconds: float = 5.0) -> list[Asked]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.asked) >= count, seconds)
            return list(self.asked)


def xenstore() -> FakeXenStore:
    return FakeXenStore({
        "backend/vif/4/0/online": "1", "backend/vif/4/0/ip": "10.137.0.60", "backend/vif/4/0/mac": "00:16:3e:5e:6c:04",
        "backend/vif/5/0/online": "1", "backend/vif/5/0/ip": "10.137.0.61", "backend/vif/5/0/mac": "00:16:3e:5e:6c:05",
    })


@contextlib.contextmanager
def watching(cache: QubesDBCache, xs: FakeXenStore) -> Iterator[Agent]:
    agent = Agent()
    watcher = QubesDBWatcher(cache, lambda: contextlib.nullcontext(xs), agent.submit)
    watcher.start()
    try:
        # Started and waiting: its first look at QubesDB is done.
        deadline = time.monotonic() + 5
        while cache.first is None and time.monotonic() < deadline:
            time.sleep(0.01)
        yield agent
    finally:
        watcher.stop()


def test_a_change_of_the_connected_addresses_asks_for_connected_ips(daemon: StandinQubesDB,
                                                                     cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.write("/connected-ips", "10.137.0.5 10.137.0.9")
        asked = agent.wait_for(1)
    assert [(prog, argv) for prog, argv, _, _ in asked] == [("vif-hotplug", ("connected-ips",))]


def test_a_mapping_that_appears_asks_for_the_online_of_the_vif_with_that_address(
    daemon: StandinQubesDB, cache: QubesDBCache,
) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.write("/mapped-ip/10.137.0.60/visible-ip", "10.138.0.2")
        asked = agent.wait_for(1)
    [(prog, argv, env, _)] = asked
    assert (prog, argv) == ("vif-route-qubes", ("online", "type_if=vif"))
    assert (env["XENBUS_PATH"], env["vif"], env["XENBUS_TYPE"]) == ("backend/vif/4/0", "vif4.0", "vif")


def test_a_mapping_of_an_address_no_online_vif_has_asks_for_nothing(daemon: StandinQubesDB,
                                                                     cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.write("/mapped-ip/10.137.0.99/visible-ip", "10.138.0.2")
        daemon.write("/connected-ips", "10.137.0.99")  # a request that is asked, after the mapping
        asked = agent.wait_for(1)
    assert [prog for prog, _, _, _ in asked] == ["vif-hotplug"]


def test_a_mapping_that_went_away_asks_for_nothing(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.rm("/mapped-ip/10.137.0.50/")
        daemon.write("/connected-ips", "10.137.0.99")
        asked = agent.wait_for(1)
    assert [prog for prog, _, _, _ in asked] == ["vif-hotplug"]


def test_a_change_made_before_the_watcher_started_is_applied(daemon: StandinQubesDB,
                                                             cache: QubesDBCache) -> None:
    SnapshotReader(cache)("/connected-ips")  # the agent's start-up reconcile read QubesDB first
    daemon.write("/connected-ips", "10.137.0.9")
    with watching(cache, xenstore()) as agent:
        asked = agent.wait_for(1)
    assert [(prog, argv) for prog, argv, _, _ in asked] == [("vif-hotplug", ("connected-ips",))]


def test_nothing_is_asked_while_nothing_changes(daemon: StandinQubesDB, cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.write("/name", "sys-net2")  # not watched
        time.sleep(0.2)
    assert agent.asked == []


def test_the_online_is_not_wanted_any_more_once_the_vif_went_offline(daemon: StandinQubesDB,
                                                                     cache: QubesDBCache) -> None:
    xs = xenstore()
    with watching(cache, xs) as agent:
        daemon.write("/mapped-ip/10.137.0.60/visible-ip", "10.138.0.2")
        [(_, _, _, still_wanted)] = agent.wait_for(1)
    xs.data["backend/vif/4/0/online"] = "0"
    assert still_wanted() is False


def test_the_online_is_not_wanted_for_a_vif_whose_device_is_not_here(daemon: StandinQubesDB,
                                                                      cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.write("/mapped-ip/10.137.0.60/visible-ip", "10.138.0.2")
        [(_, _, _, still_wanted)] = agent.wait_for(1)
    assert still_wanted() is False  # no vif4.0 in this test's network namespace


def test_the_watcher_keeps_watching_after_qubesdb_restarts(daemon: StandinQubesDB,
                                                           cache: QubesDBCache) -> None:
    with watching(cache, xenstore()) as agent:
        daemon.restart()
        time.sleep(0.1)
        daemon.write("/connected-ips", "10.137.0.9")
        asked = agent.wait_for(1)
    assert [prog for prog, _, _, _ in asked] == ["vif-hotplug"]

