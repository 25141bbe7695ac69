"""`tumorflow route` against a real Orthanc and an in-process model server serving the tiny model:
results appear in the PACS once per source and served version, failures leave nothing lost."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicom_fixtures import ct_phantom, write_dicom
from helpers import free_port, wait_until
from pacs import OrthancServer, orthanc_missing, running_orthanc, start_orthanc

from tumorflow.components.data.dicom import decode_slices, png_bytes
from tumorflow.components.data.dicom_sr import DISCLAIMER
from tumorflow.components.data.dicomweb import DicomWebClient
from tumorflow.core.config import DicomConfig, DicomWebConfig, RouteConfig
from tumorflow.serving.pacs_router import (
    OrthancChanges,
    PacsRouter,
    RouterMetrics,
    RouteState,
    build_router,
)

MODEL = "tumor"
DICOM = DicomConfig()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """This module's Orthanc with DICOMweb (credentials on); tests keep to their own studies."""
    yield from running_orthanc(tmp_path_factory)


@pytest.fixture(scope="module")
def model_base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<base>/tumor/1`: the tiny model's serving export (serving_default and explain), exported
    without its OOD detector: these tests route CT discs, not the phantom scans it was trained
    on, which the detector flags (the test of that uses the tiny model's own export)."""
    from tumorflow.components.training.export import export_serving_model
    from tumorflow.components.training.serving_statistics import (
        ServingStatistics,
        read_serving_statistics,
    )
    from tumorflow.core.artifacts import SERVING_EXPORT, SERVING_STATISTICS_FILE

    base = tmp_path_factory.mktemp("route-models")
    model = base / "tiny-without-ood"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns(SERVING_EXPORT))
    temperature = read_serving_statistics(tiny_model).temperature
    ServingStatistics(temperature).write(model / SERVING_STATISTICS_FILE)
    export_serving_model(model, base / MODEL / "1", model_name=MODEL)
    return base


def start_model_server(model_base: Path, request_log_dir: Path | None = None):
    from tumorflow.serving.server import ModelServer, ServerOptions

    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_name=MODEL,
            model_base_path=str(model_base / MODEL),
            request_log_dir=str(request_log_dir or ""),
        )
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def model_server(model_base: Path) -> Iterator[str]:
    server = start_model_server(model_base)
    try:
        yield f"127.0.0.1:{server.grpc_port}"
    finally:
        server.stop()


def authorization(orthanc: OrthancServer) -> str:
    return "Basic " + base64.b64encode(f"{orthanc.username}:{orthanc.password}".encode()).decode()


def login(orthanc: OrthancServer) -> dict[str, str]:
    return {
        "TUMORFLOW_PACS_USERNAME": orthanc.username,
        "TUMORFLOW_PACS_PASSWORD": orthanc.password,
    }


def route_config(orthanc: OrthancServer, model_server: str, **settings) -> RouteConfig:
    return RouteConfig(
        dicomweb_url=orthanc.dicomweb,
        pacs=DicomWebConfig(auth="basic", retries=1, backoff_seconds=0.01, timeout_seconds=10),
        model_server=model_server,
        **settings,
    )


def store_study(orthanc: OrthancServer, folder: Path, count: int, seed: int = 0) -> list:
    """`count` 64 px CT instances of one new study, stored in Orthanc; their datasets."""
    study = pydicom.uid.generate_uid()
    sources = []
    for index in range(count):
        path = write_dicom(
            folder / f"ct{seed}-{index}.dcm",
            ct_phantom(120.0 + 40 * index, size=64, seed=seed + index),
            study_uid=study,
        )
        orthanc.store(path.read_bytes())
        sources.append(pydicom.dcmread(path))
    return sources


def results(client: DicomWebClient, study: str, modality: str) -> list[pydicom.Dataset]:
    """Every object of `modality` in the study, read back with WADO-RS."""
    found = client.search(f"studies/{study}/instances", {"Modality": modality}, 100)
    return [
        pydicom.dcmread(
            io.BytesIO(
                client.retrieve_instance(
                    study, item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
                )
            )
        )
        for item in found
    ]


def errors_of(tool: str, path: Path) -> list[str]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (apt-get install dicom3tools)")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_each_new_instance_gets_one_report_and_one_overlay_referencing_it(
    orthanc: OrthancServer, model_server: str, tmp_path: Path
) -> None:
    from tumorflow.serving.client import ModelTarget, predict_grpc

    sources = store_study(orthanc, tmp_path, 3)
    study = sources[0].StudyInstanceUID
    config = route_config(orthanc, model_server, secondary_capture=True, batch_size=2)
    state = tmp_path / "state.json"

    def route() -> object:
        router = build_router(config, DICOM, MODEL, state, studies=[study], environ=login(orthanc))
        return router.run_pass()

    first = route()
    assert (first.routed, first.skipped, first.pending, first.dead_letter) == (3, 0, 0, 0)
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    reports, captures = results(client, study, "SR"), results(client, study, "OT")
    by_source = {
        r.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID: r for r in reports
    }
    assert sorted(by_source) == sorted(s.SOPInstanceUID for s in sources)
    assert sorted(c.SourceImageSequence[0].ReferencedSOPInstanceUID for c in captures) == sorted(
        by_source
    )
    assert all(c.BurnedInAnnotation == "YES" and c.ImageComments == DISCLAIMER for c in captures)

    # what the SR says is what the model says of the image decoded as for training
    source = sources[1]
    expected = predict_grpc(
        model_server, [png_bytes(decode_slices(source, DICOM)[0])], ModelTarget(MODEL)
    )[0]
    report_path, capture_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    by_source[source.SOPInstanceUID].save_as(report_path)
    captures[0].save_as(capture_path)
    assert errors_of("dciodvfy", report_path) == []
    assert errors_of("dciodvfy", capture_path) == []
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump is not installed (apt-get install dcmtk)")
    dump = subprocess.run(
        ["dsrdump", "+Pl", str(report_path)], capture_output=True, text=True, timeout=60
    ).stdout
    assert f'"Predicted class")="{expected.predicted_class}"' in dump
    shown = dict(re.findall(r'"Probability of (\w+)"\)="([0-9.]+)"', dump))
    assert {k: float(v) for k, v in shown.items()} == pytest.approx(
        expected.probabilities, abs=1e-5
    )
    assert '"Served model version")="1"' in dump

    again = route()
    assert (again.routed, again.already_stored) == (0, 0)
    state.unlink()  # the state is lost: the PACS is asked before storing
    lost = route()
    assert (lost.routed, lost.already_stored) == (0, 3)
    assert len(results(client, study, "SR")) == 3 and len(results(client, study, "OT")) == 3


def test_an_image_unlike_the_training_scans_gets_no_result_but_the_ood_reason(
    orthanc: OrthancServer, tiny_model: Path, tmp_path: Path
) -> None:
    from tumorflow.serving.client import NOT_A_SCAN

    shutil.copytree(tiny_model / "saved_model", tmp_path / "models" / MODEL / "1")
    server = start_model_server(tmp_path / "models")
    sources = store_study(orthanc, tmp_path, 2)
    study = sources[0].StudyInstanceUID
    config = route_config(orthanc, f"127.0.0.1:{server.grpc_port}", secondary_capture=True)
    state = tmp_path / "state.json"
    try:
        router = build_router(config, DICOM, MODEL, state, studies=[study], environ=login(orthanc))
        result = router.run_pass()
    finally:
        server.stop()
    assert (result.routed, result.skipped, result.pending) == (0, 2, 0)
    reasons = json.loads(state.read_text())["skipped"]
    assert sorted(reasons) == sorted(s.SOPInstanceUID for s in sources)
    assert all(reason.startswith(f"{NOT_A_SCAN} (score ") for reason in reasons.values())
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    assert results(client, study, "SR") == [] and results(client, study, "OT") == []


def test_a_model_server_that_is_down_leaves_instances_pending(
    orthanc: OrthancServer, model_server: str, tmp_path: Path, closed_port: int, capsys
) -> None:
    from tumorflow.cli.main import main

    sources = store_study(orthanc, tmp_path, 2, seed=10)
    study = sources[0].StudyInstanceUID
    state = tmp_path / "state.json"
    metrics = RouterMetrics()
    down = build_router(
        route_config(orthanc, f"127.0.0.1:{closed_port}", timeout_seconds=2),
        DICOM,
        MODEL,
        state,
        studies=[study],
        environ=login(orthanc),
        metrics=metrics,
    )
    result = down.run_pass()
    assert (result.routed, result.pending) == (0, 2)
    assert "no model server answers" in " ".join(result.problems) or "did not say" in " ".join(
        result.problems
    )
    http = metrics.serve(free_port(), "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{http.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exposition = response.read().decode()
    finally:
        http.shutdown()
    assert "tumorflow_route_pending 2.0" in exposition
    assert re.search(r"tumorflow_route_failed_total [1-9]", exposition)

    assert main(["route", "--status", "--state-file", str(state)]) == 0
    status = capsys.readouterr().out
    assert "2 pending" in status and all(s.SOPInstanceUID in status for s in sources)

    up = build_router(
        route_config(orthanc, model_server), DICOM, MODEL, state, environ=login(orthanc)
    )
    result = up.run_pass()  # no watcher: the pending ones only
    assert (result.routed, result.pending) == (2, 0)
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    assert len(results(client, study, "SR")) == 2


def test_a_corrupt_or_non_image_instance_is_skipped_with_its_reason(
    orthanc: OrthancServer, model_server: str, tmp_path: Path
) -> None:
    good = store_study(orthanc, tmp_path, 1, seed=20)[0]
    study = good.StudyInstanceUID
    no_pixels = pydicom.dcmread(
        write_dicom(tmp_path / "np.dcm", ct_phantom(50, 64), study_uid=study)
    )
    del no_pixels.PixelData
    truncated = pydicom.dcmread(
        write_dicom(tmp_path / "tr.dcm", ct_phantom(50, 64), study_uid=study)
    )
    truncated.PixelData = truncated.PixelData[:100]
    for dataset in (no_pixels, truncated):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        orthanc.store(buffer.getvalue())
    state = tmp_path / "state.json"
    router = build_router(
        route_config(orthanc, model_server),
        DICOM,
        MODEL,
        state,
        studies=[study],
        environ=login(orthanc),
    )
    result = router.run_pass()
    assert (result.routed, result.skipped, result.pending) == (1, 2, 0)
    skipped = RouteState.load(state).skipped
    assert set(skipped) == {no_pixels.SOPInstanceUID, truncated.SOPInstanceUID}
    assert all(reason.startswith("not a decodable image") for reason in skipped.values())
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    assert len(results(client, study, "SR")) == 1


def test_wrong_credentials_stop_the_router_with_one_clear_line(
    orthanc: OrthancServer, model_server: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from tumorflow.cli.main import main

    monkeypatch.setenv("TUMORFLOW_PACS_USERNAME", orthanc.username)
    monkeypatch.setenv("TUMORFLOW_PACS_PASSWORD", "not-the-password")
    code = main(
        [
            "route",
            "--once",
            "--model-server",
            model_server,
            "--state-file",
            str(tmp_path / "state.json"),
            "--set",
            f"route.dicomweb_url={orthanc.dicomweb}",
            "--set",
            "route.pacs.auth=basic",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "refused the credentials (HTTP 401)" in err and "route.pacs.auth" in err
    assert "not-the-password" not in err


def test_routed_requests_feed_the_request_log(
    orthanc: OrthancServer, model_base: Path, tmp_path: Path, read_store
) -> None:
    server = start_model_server(model_base, tmp_path / "request-log")
    try:
        sources = store_study(orthanc, tmp_path, 2, seed=30)
        router = build_router(
            route_config(orthanc, f"127.0.0.1:{server.grpc_port}"),
            DICOM,
            MODEL,
            tmp_path / "state.json",
            studies=[sources[0].StudyInstanceUID],
            environ=login(orthanc),
        )
        assert router.run_pass().routed == 2
    finally:
        server.stop()  # writes what is queued
    table = read_store(tmp_path / "request-log")
    assert table is not None and len(table) == 2
    assert (table["model_name"] == MODEL).all() and (table["model_version"] == 1).all()


@pytest.mark.service  # starts its own Orthanc
def test_orthanc_stopped_mid_route_then_restarted_loses_and_duplicates_nothing(
    model_server: str, tmp_path: Path
) -> None:
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    orthanc = start_orthanc(tmp_path / "own-orthanc")
    try:
        sources = store_study(orthanc, tmp_path, 4, seed=40)
        config = route_config(orthanc, model_server, watch="orthanc-changes", batch_size=2)
        state_path = tmp_path / "state.json"

        class StopsBeforeTheFirstStore(DicomWebClient):
            def store(self, instances: list[bytes]) -> dict:
                if orthanc.process.poll() is None:
                    orthanc.stop()
                return super().store(instances)

        def router(pacs_class: type[DicomWebClient]) -> PacsRouter:
            pacs = pacs_class(
                orthanc.dicomweb, authorization(orthanc), retries=1, backoff=0.01, timeout=5
            )
            rest = DicomWebClient(orthanc.url, authorization(orthanc), retries=1, backoff=0.01)
            return PacsRouter(
                config,
                DICOM,
                MODEL,
                RouteState.load(state_path),
                pacs,
                watcher=OrthancChanges(rest, config),
            )

        # batch 1 is fetched and classified, then its store fails: two dead letters on disk;
        # batch 2 cannot be fetched: two pending
        interrupted = router(StopsBeforeTheFirstStore).run_pass()
        assert interrupted.discovered == 4 and interrupted.routed == 0
        assert interrupted.dead_lettered == 2 and interrupted.pending == 2
        assert len(list((tmp_path / "dead-letter").glob("*.dcm"))) == 2
        orthanc = orthanc.restarted()
        resumed = router(DicomWebClient).run_pass()
        assert resumed.dead_letters_stored == 2 and resumed.routed == 2
        assert (resumed.pending, resumed.dead_letter) == (0, 0)
        quiet = router(DicomWebClient).run_pass()
        assert (quiet.discovered, quiet.routed, quiet.already_stored) == (0, 0, 0)

        client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
        reports = results(client, sources[0].StudyInstanceUID, "SR")
        referenced = [
            r.ContentSequence[-1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in reports
        ]
        assert sorted(referenced) == sorted(s.SOPInstanceUID for s in sources)
        state = json.loads(state_path.read_text())
        assert len(state["done"]) == 4 and not state["pending"] and not state["dead_letter"]
        assert not list((tmp_path / "dead-letter").glob("*.dcm"))
    finally:
        orthanc.stop()


def test_a_new_model_version_adds_a_new_result(
    orthanc: OrthancServer, model_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "models"
    shutil.copytree(model_base / MODEL / "1", base / MODEL / "1")
    sources = store_study(orthanc, tmp_path, 1, seed=50)
    study = sources[0].StudyInstanceUID
    state = tmp_path / "state.json"
    server = start_model_server(base)
    try:
        config = route_config(orthanc, f"127.0.0.1:{server.grpc_port}")

        def route():
            return build_router(
                config, DICOM, MODEL, state, studies=[study], environ=login(orthanc)
            ).run_pass()

        assert route().routed == 1
        shutil.copytree(model_base / MODEL / "1", base / MODEL / "2")
        wait_until(lambda: server.repository.resolve(MODEL).version == 2, 60, "version 2 served")
        assert route().routed == 1
        assert route().routed == 0
    finally:
        server.stop()
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    versions = sorted(r.SoftwareVersions for r in results(client, study, "SR"))
    assert versions == ["1", "2"]


def test_qido_polling_routes_the_recent_studies_once(
    orthanc: OrthancServer, model_server: str, tmp_path: Path
) -> None:
    from datetime import UTC, datetime, timedelta

    today = datetime.now(UTC).date()
    studies = {}
    for name, when in (("recent", today), ("old", today - timedelta(days=10))):
        study = pydicom.uid.generate_uid()
        for index in range(2):
            dataset = pydicom.dcmread(
                write_dicom(
                    tmp_path / f"{name}{index}.dcm",
                    ct_phantom(90, 64, seed=60 + index),
                    study_uid=study,
                )
            )
            dataset.StudyDate, dataset.StudyTime = f"{when:%Y%m%d}", "101500"
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            orthanc.store(buffer.getvalue())
        studies[name] = study
    # this test's studies only (the module's Orthanc holds others from today)
    query = {"StudyInstanceUID": ",".join(studies.values())}
    config = route_config(orthanc, model_server, watch="qido", lookback_days=2, query=query)
    state = tmp_path / "state.json"

    def route():
        return build_router(config, DICOM, MODEL, state, environ=login(orthanc)).run_pass()

    first = route()
    assert (first.discovered, first.routed) == (2, 2)
    again = route()
    assert (again.discovered, again.routed, again.already_stored) == (0, 0, 0)
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    assert len(results(client, studies["recent"], "SR")) == 2
    assert results(client, studies["old"], "SR") == []


@pytest.mark.service  # starts its own Orthanc and the router as a process
def test_the_service_routes_instances_as_they_arrive_and_stops_on_sigterm(
    model_server: str, tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    import yaml

    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    orthanc = start_orthanc(tmp_path / "own-orthanc")
    metrics_port = free_port()
    config = tmp_path / "route.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_root": str(tmp_path / "runs"),
                "route": {
                    "dicomweb_url": orthanc.dicomweb,
                    "watch": "orthanc-changes",
                    "model_server": model_server,
                    "model_name": MODEL,
                    "poll_seconds": 0.3,
                    "metrics_port": metrics_port,
                    "pacs": {"auth": "basic", "retries": 1, "backoff_seconds": 0.01},
                },
            }
        )
    )
    log = (tmp_path / "route.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "tumorflow.cli.main", "route", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **login(orthanc)},
    )
    client = DicomWebClient(orthanc.dicomweb, authorization(orthanc))
    try:
        for seed in (70, 71):  # one study, then another while the service runs
            [source] = store_study(orthanc, tmp_path, 1, seed=seed)

            def routed(source=source) -> bool:
                if process.poll() is not None:
                    raise AssertionError((tmp_path / "route.log").read_text())
                return len(results(client, source.StudyInstanceUID, "SR")) == 1

            wait_until(routed, 120, f"the SR of study {seed}", interval=0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert "tumorflow_route_routed_total 2.0" in r.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        log.close()
        orthanc.stop()
    state = RouteState.load(tmp_path / "runs" / "route" / "state.json")
    assert len(state.done) == 2 and not state.pending
