"""Rulesets found complete: remembered per kernel-state token, across processes through a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vif_hotplug.core.plan_base import antispoof_ruleset, base_ruleset
from vif_hotplug.kernel.verified import VerifiedRulesets, ruleset_key

RS = antispoof_ruleset((4, 6))


def test_a_ruleset_holds_only_in_the_state_it_was_found_complete_in() -> None:
    v = VerifiedRulesets()
    assert not v.holds(RS, "gen 1")
    v.put(RS, "gen 1")
    assert v.holds(RS, "gen 1")
    assert not v.holds(RS, "gen 2")
    assert not v.holds(base_ruleset(True), "gen 1")


def test_an_own_change_that_leaves_rulesets_as_they_were_moves_them_along() -> None:
    v = VerifiedRulesets()
    v.put(RS, "gen 1")
    v.advance("gen 1", "gen 2")
    assert v.holds(RS, "gen 2") and not v.holds(RS, "gen 1")


def test_the_file_carries_what_one_process_verified_to_the_next(tmp_path: Path) -> None:
    path = str(tmp_path / "verified.json")
    first = VerifiedRulesets(path)
    first.put(RS, "gen 1")
    first.advance("gen 1", "gen 2")
    first.flush()
    assert VerifiedRulesets(path).holds(RS, "gen 2")


def test_a_miss_rereads_the_file_another_process_wrote(tmp_path: Path) -> None:
    path = str(tmp_path / "verified.json")
    agent = VerifiedRulesets(path)
    agent.put(RS, "gen 1")
    fallback = VerifiedRulesets(path)
    fallback.advance("gen 1", "gen 2")
    fallback.flush()
    assert agent.holds(RS, "gen 2")


def test_an_unreadable_file_only_means_nothing_is_known(tmp_path: Path) -> None:
    path = tmp_path / "verified.json"
    path.write_text("{not json")
    v = VerifiedRulesets(str(path))
    assert not v.holds(RS, "gen 1")
    v.put(RS, "gen 1")
    assert json.loads(path.read_text()) == {ruleset_key(RS): "gen 1"}


def test_clear_forgets_everything(tmp_path: Path) -> None:
    v = VerifiedRulesets(str(tmp_path / "verified.json"))
    v.put(RS, "gen 1")
    v.clear()
    assert not VerifiedRulesets(str(tmp_path / "verified.json")).holds(RS, "gen 1")


def test_a_rulesets_name_is_the_same_in_every_process() -> None:
    code = ("from vif_hotplug.core.plan_base import antispoof_ruleset; from vif_hotplug.kernel.verified import "
            "ruleset_key; print(ruleset_key(antispoof_ruleset((4, 6))))")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert names == {ruleset_key(RS) + "\n"}


def test_the_record_is_bounded_the_least_recently_verified_going_first() -> None:
    from vif_hotplug.core.firewall import Ruleset
    from vif_hotplug.kernel.verified import MAX_RULESETS

    v = VerifiedRulesets()
    rulesets = [Ruleset(f"r{i}", ()) for i in range(MAX_RULESETS + 5)]
    for rs in rulesets:
        v.put(rs, "gen 1")
    assert not v.holds(rulesets[0], "gen 1")
    assert all(v.holds(rs, "gen 1") for rs in rulesets[-MAX_RULESETS:])


def test_agent_threads_sharing_one_record_lose_nothing(tmp_path: Path) -> None:
    import threading

    v = VerifiedRulesets(str(tmp_path / "verified.json"))
    from vif_hotplug.core.firewall import Ruleset

    rulesets = [Ruleset(f"r{i}", ()) for i in range(32)]
    errors: list[BaseException] = []

    def work(rs: Ruleset) -> None:
        try:
            for n in range(50):
                v.put(rs, f"gen {n}")
                v.advance(f"gen {n}", f"gen {n}")
                assert v.holds(rs, f"gen {n}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(rs,)) for rs in rulesets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(json.loads((tmp_path / "verified.json").read_text())) == 32
