"""Salted pseudonymous ids: what replaces patient ids, study UIDs and site names after ingest.

An id is `<kind>-<12 hex>` of HMAC-SHA256(salt, kind + value): stable for one salt (the same
patient gets the same id in every run, so splits and per-site results stay comparable), and not
reversible without the salt, even by trying every plausible patient id.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from tumorflow.core.config import DicomConfig
from tumorflow.core.errors import ConfigError

ID_HEX = 12


def resolve_salt(config: DicomConfig) -> str:
    """The salt: the content of `pseudonym_salt_file` when set, else `pseudonym_salt`."""
    if config.pseudonym_salt_file:
        path = Path(config.pseudonym_salt_file).expanduser()
        try:
            salt = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"dataset.dicom.pseudonym_salt_file {path} cannot be read ({exc.strerror})"
            ) from None
    else:
        salt = config.pseudonym_salt
    if not salt:
        raise ConfigError(
            "DICOM data needs a salt for its pseudonymous patient ids: set "
            "dataset.dicom.pseudonym_salt_file (a file holding a secret) or dataset.dicom.pseudonym_salt"
        )
    return salt


def pseudonym(kind: str, value: str, salt: str) -> str:
    """`<kind>-<hex>` for a non-empty `value`, "" for an empty one."""
    value = str(value).strip()
    if not value:
        return ""
    digest = hmac.new(salt.encode(), f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:ID_HEX]}"
