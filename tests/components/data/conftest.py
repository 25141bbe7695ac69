"""Fixtures of the data-step tests: a real PACS (Orthanc with DICOMweb) on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pacs import OrthancServer, running_orthanc


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the session (credentials on, temporary storage); skips where Orthanc and
    its DICOMweb plugin are not installed. Tests keep apart by querying their own studies."""
    yield from running_orthanc(tmp_path_factory)
