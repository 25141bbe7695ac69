"""The one Orthanc starter (bench/orthanc.py) of `tumorflow bench route` and the tests: where
Orthanc or its DICOMweb plugin is missing it says what to install and starts nothing. (Starting,
storing, stopping and restarting are exercised by every PACS test through tests/pacs.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorflow.bench import orthanc
from tumorflow.core.errors import ConfigError


def test_without_orthanc_the_starter_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(orthanc.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"apt-get install orthanc orthanc-dicomweb"):
        orthanc.start_orthanc(tmp_path / "pacs", "user", "secret")
    assert not (tmp_path / "pacs").exists()


def test_without_the_dicomweb_plugin_the_starter_names_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(orthanc.shutil, "which", lambda name: "/usr/sbin/Orthanc")
    monkeypatch.setattr(orthanc, "DICOMWEB_PLUGIN", tmp_path / "libOrthancDicomWeb.so")
    with pytest.raises(ConfigError, match=r"DICOMweb plugin is missing .*orthanc-dicomweb"):
        orthanc.start_orthanc(tmp_path / "pacs", "user", "secret")
