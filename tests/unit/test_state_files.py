"""Per-namespace records (kernel.state_files): named so they only ever describe their own namespace."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from vif_hotplug.kernel import state_files
from vif_hotplug.kernel.state_files import atomic_write, netns_cookie, netns_key, prune, state_file


def test_this_kernel_names_records_by_namespace_cookie() -> None:
    cookie = netns_cookie()
    assert cookie is not None  # Linux 5.14 and later
    ino = os.stat("/proc/thread-self/ns/net").st_ino
    assert netns_key() == f"{ino}-{cookie}"
    assert state_file("/s", "backend") == f"/s/backend-{ino}-{cookie}.json"


def test_a_record_of_a_dead_namespace_with_this_ones_inode_is_removed(tmp_path: Path) -> None:
    ino, _, cookie = netns_key().partition("-")
    mine = tmp_path / f"backend-{ino}-{cookie}.json"
    dead_same_inode = tmp_path / f"verified-nftables-{ino}-{int(cookie) + 1}.json"
    for f in (mine, dead_same_inode):
        f.write_text("{}")
    assert prune(str(tmp_path), live={int(ino)}) == [dead_same_inode.name]
    assert mine.exists()


def test_records_of_namespaces_nothing_holds_are_removed_and_of_live_ones_kept(tmp_path: Path) -> None:
    ino = netns_key().partition("-")[0]
    live_other = tmp_path / "backend-424242-7.json"
    gone = tmp_path / "connected-iptables-99-3.json"
    unrelated = tmp_path / "agent.sock"
    for f in (live_other, gone, unrelated):
        f.write_text("")
    prune(str(tmp_path), live={int(ino), 424242})
    assert live_other.exists() and unrelated.exists() and not gone.exists()


def test_the_live_namespaces_include_this_one() -> None:
    assert os.stat("/proc/thread-self/ns/net").st_ino in state_files.live_netns_inodes()


def test_concurrent_writers_never_share_a_temporary_name_and_readers_see_whole_contents(tmp_path: Path) -> None:
    path = str(tmp_path / "record.json")
    texts = [str(i) * 1000 for i in range(20)]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(20):
                atomic_write(path, text)
                assert Path(path).read_text() in texts
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and [p.name for p in tmp_path.iterdir()] == ["record.json"]
