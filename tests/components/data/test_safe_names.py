"""Safe copy names: any name a folder can hold is copied under a name every file system keeps,
and the original comes back byte for byte."""

from __future__ import annotations

import os

from helpers import HOSTILE_NAMES

from tumorflow.components.data.safe_names import escape_name, original_name, safe_copy_paths


def test_escaped_names_round_trip_every_byte() -> None:
    for raw in (*HOSTILE_NAMES, bytes(range(1, 256)).replace(b"/", b""), b"100%25 %zz.png"):
        name = os.fsdecode(raw)
        escaped = escape_name(name)
        assert escaped.isprintable() and "\n" not in escaped
        assert os.fsencode(original_name(escaped)) == raw


def test_hostile_and_case_colliding_names_are_renamed_and_plain_ones_kept() -> None:
    copies = safe_copy_paths(["tumor/a.png", "tumor/A.png", "tumor/-rf.png", "tumor/b\nc.png"])

    paths = [path for path, _ in copies]
    assert copies[0] == ("tumor/a.png", "")
    assert len({p.casefold() for p in paths}) == 4
    assert all(p.startswith("tumor/") and p.endswith(".png") for p in paths)
    assert not paths[2].startswith("tumor/-") and "\n" not in paths[3]
    assert [original_name(original) for _, original in copies[1:]] == [
        "tumor/A.png",
        "tumor/-rf.png",
        "tumor/b\nc.png",
    ]
