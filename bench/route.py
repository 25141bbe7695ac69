"""`tumorflow bench route`: instances per second that `tumorflow route` fetches, classifies and
stores back, against a local Orthanc (started here, or `--dicomweb-url`) and an in-process model
server, with two baselines of the same run on the same instances: fetching alone (WADO-RS), and
decoding plus predicting alone (gRPC, instances already in memory).

The full route does per instance: WADO-RS, the training decode, gRPC Predict (batched), a QIDO-RS
look-up of the result's UID and a STOW-RS store. Everything listens on loopback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from tumorflow.bench.orthanc import orthanc_missing, start_orthanc
from tumorflow.core.config import DicomConfig, DicomWebConfig, RouteConfig
from tumorflow.core.errors import ConfigError

MODEL_NAME = "bench"
_USER, _PASSWORD = "bench", "bench-route"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=40, help="CT instances routed (40)")
    parser.add_argument("--size", type=int, default=256, help="pixels across each instance (256)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per Predict call (8)")
    parser.add_argument("--image-size", type=int, default=96, help="the model's input size (96)")
    parser.add_argument(
        "--dicomweb-url",
        default="",
        help="an Orthanc's DICOMweb root to use (user and password in TUMORFLOW_PACS_USERNAME / "
        "TUMORFLOW_PACS_PASSWORD); default: start one here (needs Orthanc with DICOMweb)",
    )


def _instances(count: int, size: int) -> tuple[str, list[bytes]]:
    """`count` CT slices of one study (a disc in soft tissue, random texture) as Part 10 bytes."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    files = []
    for index in range(count):
        y, x = np.mgrid[:size, :size]
        disc = (y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / rng.uniform(4, 8)) ** 2
        hu = np.where(disc, rng.uniform(20, 250), 40.0) + rng.normal(0, 10, (size, size))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Patient", "BENCH-1"
        ds.InstanceNumber = index + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return study, files


def _served_model(folder: Path, image_size: int) -> Path:
    """An untrained custom_cnn (speed does not depend on the weights) exported for serving."""
    from tumorflow.bench.serving import _default_model_folder
    from tumorflow.components.training.export import export_serving_model

    model_dir = _default_model_folder(folder / "model", "custom_cnn", image_size)
    version = folder / "models" / MODEL_NAME / "1"
    export_serving_model(model_dir, version, model_name=MODEL_NAME)
    return version.parent


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def run(args: argparse.Namespace) -> int:
    from tumorflow.components.data.dicom import decode_slices, png_bytes, read_dataset
    from tumorflow.serving.client import ModelTarget, predict_grpc
    from tumorflow.serving.pacs_router import build_router, pacs_clients, study_instances
    from tumorflow.serving.server import ModelServer, ServerOptions

    if args.instances < 1 or args.size < 16 or args.batch_size < 1:
        raise ConfigError("--instances and --batch-size must be positive, --size at least 16")
    work = Path(tempfile.mkdtemp(prefix="tumorflow-bench-route-"))
    orthanc = None
    environ = dict(os.environ)
    try:
        if args.dicomweb_url:
            dicomweb = args.dicomweb_url.rstrip("/")
        else:
            missing = orthanc_missing()
            if missing:
                raise ConfigError(f"{missing}; or give bench route --dicomweb-url of a running one")
            orthanc = start_orthanc(work / "orthanc", _USER, _PASSWORD, name="BENCH")
            dicomweb = orthanc.dicomweb
            environ.update(TUMORFLOW_PACS_USERNAME=_USER, TUMORFLOW_PACS_PASSWORD=_PASSWORD)
        study, files = _instances(args.instances, args.size)
        config = RouteConfig(
            dicomweb_url=dicomweb,
            pacs=DicomWebConfig(auth="basic"),
            batch_size=args.batch_size,
            model_server="",
        )
        router_pacs, _ = pacs_clients(config, environ)
        for data in files:
            router_pacs.store([data])
        server = ModelServer(
            ServerOptions(
                port=0,
                rest_api_port=0,
                model_name=MODEL_NAME,
                model_base_path=str(_served_model(work, args.image_size)),
            )
        )
        server.start()
        try:
            target_server = f"127.0.0.1:{server.grpc_port}"
            config = config.model_copy(update={"model_server": target_server})
            refs = list(study_instances(router_pacs, study, ["CT"], 200))

            started = time.perf_counter()
            fetched = [router_pacs.retrieve_instance(r.study, r.series, r.sop) for r in refs]
            fetch_s = time.perf_counter() - started

            target = ModelTarget(MODEL_NAME)
            predict_grpc(
                target_server,
                [png_bytes(decode_slices(read_dataset(fetched[0]), DicomConfig())[0])],
                target,
            )
            started = time.perf_counter()
            images = [png_bytes(decode_slices(read_dataset(d), DicomConfig())[0]) for d in fetched]
            for start in range(0, len(images), args.batch_size):
                predict_grpc(target_server, images[start : start + args.batch_size], target)
            predict_s = time.perf_counter() - started

            router = build_router(
                config,
                DicomConfig(),
                MODEL_NAME,
                work / "state.json",
                studies=[study],
                environ=environ,
            )
            started = time.perf_counter()
            result = router.run_pass()
            route_s = time.perf_counter() - started
        finally:
            server.stop()
        if result.routed != len(refs):
            raise ConfigError(
                f"the route pass routed {result.routed} of {len(refs)}: {result.line()}"
            )
    finally:
        if orthanc is not None:
            orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)

    count = len(refs)
    route_rate = _rate(count, route_s)
    rows = [
        ("fetch only (WADO-RS)", fetch_s),
        (f"decode + predict only (gRPC, batch {args.batch_size})", predict_s),
        ("route (fetch, decode, predict, QIDO, STOW SR)", route_s),
    ]
    print(f"{count} CT instances of {args.size} px, model input {args.image_size} px, loopback")
    print(f"{'measurement':52s} {'seconds':>8s} {'inst/s':>8s} {'route/this':>10s}")
    for name, seconds in rows:
        rate = _rate(count, seconds)
        print(f"{name:52s} {seconds:8.3f} {rate:8.1f} {route_rate / rate:10.2f}")
    return 0
