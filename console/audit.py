"""The console's append-only audit log: one JSON line per decision, rollback or promotion."""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()


def append_event(path: Path, who: str, what: str, why: str = "", **details: Any) -> dict[str, Any]:
    """Append one event (who, when, what, why, details) and flush it to disk; return it."""
    event = {
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "who": who,
        "what": what,
        "why": why,
        **details,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCK, path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(event, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return event


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of the log, newest first (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in reversed(lines) if line.strip()]
