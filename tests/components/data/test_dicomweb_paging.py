"""QIDO-RS answers with thousands of instances: paged with limit/offset, one page in memory at a
time. Against a loopback server that answers QIDO-RS pages as a PACS does and records each request
(storing thousands of instances in the test Orthanc takes about half a minute; its paging is tested
in test_dicomweb.py)."""

from __future__ import annotations

import http.server
import json
import threading
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from tumorflow.components.data.dicomweb import DicomWebClient, DicomWebQuery, search_instances

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = f"{STUDY}.1"


def _instance(index: int) -> dict:
    """One instance as a QIDO-RS answer lists it (PS3.18 table 10.6.3-5, the attributes Orthanc
    returns)."""
    sop = f"{SERIES}.{index + 1}"

    def value(vr: str, *values) -> dict:
        return {"vr": vr, "Value": list(values)}

    return {
        "00080005": value("CS", "ISO_IR 100"),
        "00080016": value("UI", "1.2.840.10008.5.1.4.1.1.2"),
        "00080018": value("UI", sop),
        "00080056": value("CS", "ONLINE"),
        "00080060": value("CS", "CT"),
        "00081190": value("UR", f"http://pacs.test/dicom-web/studies/{STUDY}/instances/{sop}"),
        "0020000D": value("UI", STUDY),
        "0020000E": value("UI", SERIES),
        "00200013": value("IS", index + 1),
        "00280010": value("US", 512),
        "00280011": value("US", 512),
        "00280100": value("US", 16),
    }


class QidoPacs:
    """A loopback QIDO-RS server: one study of `instances` CT instances, answered page by page
    (`limit`/`offset`, at most `max_page` per answer, with PS3.18's Warning header when it leaves
    results out). Records the query of every request."""

    def __init__(self, instances: int, max_page: int = 10_000) -> None:
        self.instances = instances
        self.max_page = max_page
        self.queries: list[tuple[str, dict[str, str]]] = []
        pacs = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                pacs.queries.append((url.path, query))
                total = 1 if url.path.endswith("/studies") else pacs.instances
                offset = int(query.get("offset", 0))
                end = min(total, offset + min(int(query.get("limit", total)), pacs.max_page))
                if url.path.endswith("/studies"):
                    items = [{"0020000D": {"vr": "UI", "Value": [STUDY]}}][offset:end]
                else:
                    items = [_instance(index) for index in range(offset, end)]
                body = json.dumps(items).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                if end < total and end - offset < int(query.get("limit", total)):
                    self.send_header(
                        "Warning",
                        '299 pacs.test: "There are additional results that can be requested"',
                    )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/dicom-web"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def instance_pages(self) -> list[tuple[int, int]]:
        return [
            (int(q["offset"]), int(q["limit"]))
            for path, q in self.queries
            if path.endswith("/instances")
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def qido_pacs() -> Iterator[Callable[..., QidoPacs]]:
    servers: list[QidoPacs] = []

    def start(*args, **kwargs) -> QidoPacs:
        servers.append(QidoPacs(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _listing_peak(url: str, page_size: int) -> tuple[int, list]:
    """The instances the query lists, and the most memory that listing them held (bytes)."""
    query = DicomWebQuery.parse(f"dicomweb+{url}?ModalitiesInStudy=CT")
    client = DicomWebClient(query.base_url, retries=0)
    tracemalloc.start()
    try:
        refs = search_instances(client, query, page_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, refs


def test_thousands_of_instances_are_listed_page_by_page_in_bounded_memory(qido_pacs) -> None:
    small, large = qido_pacs(500), qido_pacs(5000)
    small_peak, small_refs = _listing_peak(small.url, 200)
    large_peak, large_refs = _listing_peak(large.url, 200)
    assert len(small_refs) == 500 and len(large_refs) == 5000
    assert len({ref.sop for ref in large_refs}) == 5000
    assert [ref.sop for ref in large_refs] == sorted(ref.sop for ref in large_refs)
    # one study page, then the study's instances 200 at a time until a page comes back short
    assert [q["limit"] for path, q in large.queries if path.endswith("/studies")] == ["200"]
    assert large.instance_pages() == [(offset, 200) for offset in range(0, 5001, 200)]
    assert all(q["Modality"] == "CT" for path, q in large.queries if path.endswith("/instances"))
    # each instance kept is its three UIDs, not the QIDO item it came in (well over 1 kB here):
    # ten times the instances is far from ten times the memory
    per_instance = (large_peak - small_peak) / 4500
    assert per_instance < 1000, f"{per_instance:.0f} bytes per instance listed"
    assert large_peak < 3 * small_peak, (small_peak, large_peak)


def test_a_pacs_that_caps_its_pages_below_the_limit_is_paged_to_the_end(qido_pacs) -> None:
    """A server may answer fewer results than `limit` and warn that there are more (PS3.18
    6.7.1.2.1): a short page with that warning does not end the listing."""
    capped = qido_pacs(1234, max_page=100)
    _, refs = _listing_peak(capped.url, 200)
    assert len(refs) == 1234
    assert capped.instance_pages() == [(offset, 200) for offset in range(0, 1234, 100)]


def test_the_search_generator_holds_one_page_at_a_time(qido_pacs) -> None:
    """Consuming the listing lazily asks for the next page only when the last one is used up."""
    pacs = qido_pacs(1000)
    client = DicomWebClient(pacs.url, retries=0)
    items = client.search(f"studies/{STUDY}/instances", {}, 100)
    first = [next(items) for _ in range(150)]
    assert len(first) == 150
    assert pacs.instance_pages() == [(0, 100), (100, 100)]
    assert sum(1 for _ in items) == 850
    assert len(pacs.instance_pages()) == 11
