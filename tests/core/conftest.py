"""Fixtures of the core tests: the GCS emulator holding GCS's generation preconditions."""

from __future__ import annotations

from http import HTTPStatus

import pytest


@pytest.fixture()
def gcs_emulator_preconditions(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The GCS emulator, refusing uploads whose `ifGenerationMatch` is stale, as GCS does.

    gcp-storage-emulator accepts the parameter and ignores it. Its HTTP server answers one
    request at a time, so checking the live generation right before the upload handler runs is
    as atomic as GCS's own check: 412 when the object is not at the generation asked for (0: it
    must not exist). The real client sends the request and parses the answer as against GCS.
    """
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    upload = objects.insert

    def live_generation(storage, bucket: str, name: str) -> int:
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except NotFound:
            return 0

    def insert_if_generation_matches(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            if "name" in request.query:
                name = request.query["name"][0]
            else:
                name = request.data["meta"]["name"]
            if live_generation(storage, request.params["bucket_name"], name) != int(wanted[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                message = "At least one of the pre-conditions you specified did not hold."
                response.json(
                    {
                        "error": {
                            "code": 412,
                            "message": message,
                            "errors": [{"reason": "conditionNotMet", "message": message}],
                        }
                    }
                )
                return None
        return upload(request, response, storage, *args, **kwargs)

    monkeypatch.setattr(objects, "insert", insert_if_generation_matches)
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is upload:
                monkeypatch.setitem(handlers, method, insert_if_generation_matches)
    return gcs_emulator
