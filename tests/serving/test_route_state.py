"""The router's state file (serving/pacs_router.py `RouteState`): what a restart reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorflow.components.data.dicomweb import InstanceRef
from tumorflow.core.errors import ConfigError
from tumorflow.serving.pacs_router import RouteState, done_key


def test_a_restarted_router_knows_every_instance_it_has_seen(tmp_path: Path) -> None:
    state = RouteState.load(tmp_path / "route" / "state.json")
    state.add_pending(InstanceRef("1.1", "1.1.1", "1.1.1.1"))
    state.done[done_key("1.1.1.2", "kidney-ct", 3)] = "2.9.9"
    state.skipped["1.1.1.3"] = "not a decodable image: no pixel data"
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
