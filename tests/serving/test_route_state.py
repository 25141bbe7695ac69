"""The router's state file (serving/pacs_router.py `RouteState`): what a restart reads back."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest

from tumorflow.components.data.dicomweb import InstanceRef
from tumorflow.core.config import DicomConfig, RouteConfig
from tumorflow.core.errors import ConfigError
from tumorflow.serving.pacs_router import (
    STATE_RETENTION_MARGIN_DAYS,
    PacsRouter,
    RouteState,
    done_key,
)


def test_a_restarted_router_knows_every_instance_it_has_seen(tmp_path: Path) -> None:
    state = RouteState.load(tmp_path / "route" / "state.json")
    state.add_pending(InstanceRef("1.1", "1.1.1", "1.1.1.1"))
    state.record_done(done_key("1.1.1.2", "kidney-ct", 3), "2.9.9")
    state.record_skipped("1.1.1.3", "not a decodable image: no pixel data")
    state.dead_letter["2.9.8"] = {"study": "1.1", "series": "1.1.1", "sop": "1.1.1.4"}
    state.changes_since = 42
    state.save()
    again = RouteState.load(tmp_path / "route" / "state.json")
    assert all(again.known(f"1.1.1.{n}") for n in range(1, 5))
    assert not again.known("1.1.1.5")
    assert again.changes_since == 42
    assert again.backlog() == {"pending": 1, "dead_letter": 1, "skipped": 1, "done": 1}
    assert [p.name for p in (tmp_path / "route").iterdir()] == ["state.json"]


def test_adding_a_pending_instance_twice_keeps_its_attempts(tmp_path: Path) -> None:
    state = RouteState(tmp_path / "state.json")
    ref = InstanceRef("1.1", "1.1.1", "1.1.1.1")
    state.add_pending(ref)
    state.pending[ref.sop]["attempts"] = 3
    state.add_pending(ref)
    assert state.pending[ref.sop]["attempts"] == 3


def test_an_unreadable_state_file_says_how_to_start_over(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="move it away to start over"):
        RouteState.load(path)


class Calendar:
    """A clock for the state's record dates that the test moves on by hand."""

    def __init__(self) -> None:
        self.day = date(2026, 1, 1)

    def __call__(self) -> date:
        return self.day


def test_records_of_instances_not_seen_for_the_retention_are_forgotten(tmp_path: Path) -> None:
    calendar = Calendar()
    state = RouteState(tmp_path / "state.json", today=calendar)
    for version in (1, 2):
        state.record_done(done_key("old", "kidney-ct", version), f"2.{version}")
        state.record_done(done_key("again", "kidney-ct", version), f"3.{version}")
    state.record_skipped("broken", "not a decodable image: no pixel data")
    state.add_pending(InstanceRef("1", "1.1", "waiting"))
    state.dead_letter["9.9"] = {"study": "1", "series": "1.1", "sop": "refused", "files": []}
    state.touch("refused")
    calendar.day += timedelta(days=10)
    state.touch("again")  # the watcher found it again
    assert state.prune(keep_days=10) == 0
    calendar.day += timedelta(days=1)
    assert state.prune(keep_days=10) == 2  # "old" and "broken"
    assert state.done == {
        done_key("again", "kidney-ct", 1): "3.1",
        done_key("again", "kidney-ct", 2): "3.2",
    }
    assert not state.skipped and not state.known("old") and not state.known("broken")
    # nothing waiting is ever forgotten: pending instances and dead letters stay
    assert state.known("waiting") and "9.9" in state.dead_letter
    state.save()
    again = RouteState.load(state.path, today=calendar)
    assert set(again.seen) == {"again", "waiting", "refused"}


def test_a_state_file_written_before_record_dates_counts_its_records_from_today(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    old_format = {"changes_since": 7, "done": {done_key("a", "m", 1): "2.1"}, "skipped": {"b": "x"}}
    path.write_text(json.dumps(old_format))
    calendar = Calendar()
    state = RouteState.load(path, today=calendar)
    assert state.seen == {"a": "2026-01-01", "b": "2026-01-01"}
    assert state.known("a") and state.known("b") and not state.known("c")


class NoNewInstances:
    def discover(self, state: RouteState) -> int:
        return 0


def test_every_pass_prunes_the_state_file_it_saves(tmp_path: Path) -> None:
    """A router running for months keeps a file of the last days' instances, not of all."""
    calendar = Calendar()
    state = RouteState(tmp_path / "state.json", today=calendar)
    config = RouteConfig(dicomweb_url="http://127.0.0.1:9/dicom-web", lookback_days=2)
    router = PacsRouter(
        config, DicomConfig(), "kidney-ct", state, pacs=None, watcher=NoNewInstances()
    )
    keep_days = config.lookback_days + STATE_RETENTION_MARGIN_DAYS
    for day in range(60):
        for n in range(50):
            state.record_done(done_key(f"{day}.{n}", "kidney-ct", 1), f"2.{day}.{n}")
        router.run_pass()
        calendar.day += timedelta(days=1)
    saved = json.loads(state.path.read_text())
    assert len(saved["done"]) == len(saved["seen"]) == 50 * (keep_days + 1)
    assert min(saved["seen"].values()) == (calendar.day - timedelta(days=keep_days + 1)).isoformat()
