"""`tumorflow route`: results back to the PACS. New images in, one DICOM SR each out.

A pass of `PacsRouter`:
1. retries the dead letters (results the PACS would not take earlier, kept as files);
2. finds new instances (`OrthancChanges`: Orthanc's `/changes?since=N` feed; `QidoPolling`:
   QIDO-RS over the studies of the last days, for any DICOMweb server; or an explicit list of
   studies) and records them as pending before the cursor moves, so a crash loses nothing;
3. for each pending instance: WADO-RS fetch, the training decode (`components/data/dicom.py`,
   the dataset's window), a gRPC Predict (or the `explain` signature when a Grad-CAM capture is
   wanted) to the model server, the SR of `components/data/dicom_sr.py`, a QIDO-RS look-up of
   its SOP Instance UID and, only when the PACS lacks it, a STOW-RS store.

Idempotent: a result's UIDs derive from the source instance and the served version, the state
file remembers what was stored per (instance, model, version) until the watcher has not seen the
instance for `lookback_days` + a margin (then it is pruned), and the PACS is asked before
storing. A model server that does not answer leaves instances pending (the next pass retries); a
PACS that fails after the client's retries turns the result into a dead letter (the objects are
kept on disk and stored by a later pass or `--retry-dead-letters`); an instance that is no image
or cannot be decoded is skipped with its reason, and so is an image the model's OOD detector flags
("not a scan like the training data (score S)": no clinical result is stored). Wrong credentials stop the router with one
message. The model server's request log records routed requests as it records any other, so
the drift monitor sees them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tumorflow.components.data.dicom import DicomDecodeError, decode_slices, png_bytes, read_dataset
from tumorflow.components.data.dicom_sr import (
    Prediction,
    overlay_capture,
    prediction_report,
    report_bytes,
)
from tumorflow.components.data.dicomweb import (
    CredentialsRefusedError,
    DicomWebClient,
    InstanceRef,
    PacsRefusedError,
    authorization_header,
)
from tumorflow.core.config import DicomConfig, RouteConfig
from tumorflow.core.errors import ConfigError, SourceUnavailableError
from tumorflow.serving.client import (
    ExplainedPrediction,
    ImagePrediction,
    ModelTarget,
    RequestRejectedError,
    ServerUnavailableError,
    explain_grpc,
    predict_each,
    predict_grpc,
)

logger = logging.getLogger(__name__)

_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_FAILED_SOP_SEQUENCE, _FAILURE_REASON = "00081198", "00081197"
_CHANGES_PAGE = 200
_RESULT_MANUFACTURER = "tumorflow"


# --- state ------------------------------------------------------------------------------------


def _ref_dict(ref: InstanceRef) -> dict[str, str]:
    return {"study": ref.study, "series": ref.series, "sop": ref.sop}


def _ref(entry: Mapping[str, Any]) -> InstanceRef:
    return InstanceRef(entry["study"], entry["series"], entry["sop"])


# A routed or skipped instance's record is kept this many days after the watcher last saw it,
# beyond route.lookback_days. It only saves work: the PACS is asked before anything is stored, so
# an instance found again after its record is gone gets no second result.
STATE_RETENTION_MARGIN_DAYS = 7


def _utc_today() -> date:
    return datetime.now(UTC).date()


@dataclass
class RouteState:
    """What the router has done, persisted as JSON after every change (atomic replace).

    `changes_since` is the changes-feed cursor; `done` maps "SOP|model|version" to the stored
    result's SOP Instance UID; `pending` and `skipped` are keyed by source SOP Instance UID;
    `dead_letter` by result UID, each with the files of the objects the PACS did not take;
    `seen` dates each source SOP Instance UID the router knows by the day the watcher last found
    it (or it was routed), which `prune` goes by so the file does not grow forever.
    """

    path: Path
    changes_since: int = 0
    done: dict[str, str] = field(default_factory=dict)
    pending: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    dead_letter: dict[str, dict] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)
    today: Callable[[], date] = field(default=_utc_today, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path, today: Callable[[], date] = _utc_today) -> RouteState:
        path = Path(path)
        if not path.exists():
            return cls(path, today=today)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"the route state file {path} cannot be read ({exc}); move it away to start over "
                "(results already in the PACS are not stored twice)"
            ) from None
        state = cls(
            path,
            int(data.get("changes_since", 0)),
            dict(data.get("done", {})),
            dict(data.get("pending", {})),
            dict(data.get("skipped", {})),
            dict(data.get("dead_letter", {})),
            dict(data.get("seen", {})),
            today,
        )
        # a file written before `seen` existed: its records count from today
        for sop in state._record_sops():
            state.seen.setdefault(sop, state.today().isoformat())
        return state

    @property
    def dead_letter_dir(self) -> Path:
        return self.path.parent / "dead-letter"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "changes_since": self.changes_since,
            "done": self.done,
            "pending": self.pending,
            "skipped": self.skipped,
            "dead_letter": self.dead_letter,
            "seen": self.seen,
        }
        partial = self.path.with_suffix(f".part{os.getpid()}")
        partial.write_text(json.dumps(body, indent=1, sort_keys=True))
        partial.replace(self.path)

    def _record_sops(self) -> set[str]:
        return (
            {key.split("|", 1)[0] for key in self.done}
            | set(self.pending)
            | set(self.skipped)
            | {entry["sop"] for entry in self.dead_letter.values()}
        )

    def known(self, sop: str) -> bool:
        """Seen before in any state (for polling: only instances never seen are new)."""
        return sop in self.seen or sop in self.pending or sop in self.skipped

    def touch(self, sop: str) -> None:
        """The watcher found `sop` again today: its records are kept from today on."""
        self.seen[sop] = self.today().isoformat()

    def add_pending(self, ref: InstanceRef) -> None:
        self.pending.setdefault(ref.sop, {**_ref_dict(ref), "attempts": 0, "reason": "new"})
        self.touch(ref.sop)

    def record_done(self, key: str, result_uid: str) -> None:
        """The result of key's instance and version is in the PACS (its SOP Instance UID)."""
        self.done[key] = result_uid
        self.touch(key.split("|", 1)[0])

    def record_skipped(self, sop: str, reason: str) -> None:
        self.pending.pop(sop, None)
        self.skipped[sop] = reason
        self.touch(sop)

    def prune(self, keep_days: int) -> int:
        """Forget the done and skipped records of the instances not seen for more than
        `keep_days` days (pending instances and dead letters are never forgotten); how many."""
        cutoff = (self.today() - timedelta(days=keep_days)).isoformat()
        keep = set(self.pending) | {entry["sop"] for entry in self.dead_letter.values()}
        old = {sop for sop, day in self.seen.items() if day < cutoff and sop not in keep}
        if not old:
            return 0
        self.done = {k: v for k, v in self.done.items() if k.split("|", 1)[0] not in old}
        self.skipped = {k: v for k, v in self.skipped.items() if k not in old}
        self.seen = {k: v for k, v in self.seen.items() if k not in old}
        return len(old)

    def backlog(self) -> dict[str, int]:
        return {
            "pending": len(self.pending),
            "dead_letter": len(self.dead_letter),
            "skipped": len(self.skipped),
            "done": len(self.done),
        }


def done_key(sop: str, model_name: str, version: int | str) -> str:
    return f"{sop}|{model_name}|{version}"


# --- metrics ----------------------------------------------------------------------------------


class RouterMetrics:
    """The router's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, text: str) -> Counter:
            return Counter(f"tumorflow_route_{name}", text, registry=self.registry)

        self.routed = counter(
            "routed", "Results stored in the PACS (one per instance and version)."
        )
        self.already_stored = counter(
            "already_stored", "Results found in the PACS already, so not stored again."
        )
        self.skipped = counter("skipped", "Instances skipped: no image, undecodable, refused.")
        self.failed = counter("failed", "Failed attempts: PACS or model server errors.")
        self.dead_lettered = counter(
            "dead_lettered", "Results the PACS did not take after the retries."
        )
        self.pending = Gauge(
            "tumorflow_route_pending",
            "Instances waiting for a (next) attempt.",
            registry=self.registry,
        )
        self.dead_letter = Gauge(
            "tumorflow_route_dead_letter",
            "Results waiting in the dead-letter list.",
            registry=self.registry,
        )

    def update_backlog(self, state: RouteState) -> None:
        self.pending.set(len(state.pending))
        self.dead_letter.set(len(state.dead_letter))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str) -> Any:
        """Serve /metrics on host:port in a thread; the HTTP server (call shutdown to stop)."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot bind the metrics port {host}:{port}: {exc}") from None
        return server


# --- finding new instances --------------------------------------------------------------------


def _value(item: Mapping, tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def study_instances(
    pacs: DicomWebClient, study: str, modalities: list[str], page_size: int
) -> Iterator[InstanceRef]:
    """The instances of one study of the given modalities (QIDO-RS, paged)."""
    for modality in modalities:
        for item in pacs.search(f"studies/{study}/instances", {"Modality": modality}, page_size):
            yield InstanceRef(study, _value(item, _SERIES_UID), _value(item, _SOP_UID))


class QidoPolling:
    """New instances by QIDO-RS: the studies of the last `lookback_days` (StudyDate range, plus
    the configured filters), each instance of the routed modalities not seen before."""

    def __init__(self, pacs: DicomWebClient, config: RouteConfig, today: Callable[[], date]):
        self.pacs = pacs
        self.config = config
        self.today = today

    def discover(self, state: RouteState) -> int:
        end = self.today()
        start = end - timedelta(days=self.config.lookback_days)
        filters = {**self.config.query, "StudyDate": f"{start:%Y%m%d}-{end:%Y%m%d}"}
        found = 0
        page = self.config.pacs.page_size
        for study_item in self.pacs.search("studies", filters, page):
            study = _value(study_item, _STUDY_UID)
            for ref in study_instances(self.pacs, study, self.config.modalities, page):
                if state.known(ref.sop):
                    state.touch(ref.sop)
                else:
                    state.add_pending(ref)
                    found += 1
        return found


class OrthancChanges:
    """New instances from Orthanc's changes feed (`GET /changes?since=N&limit=M`): each
    NewInstance change of a routed modality, not one of the router's own results."""

    def __init__(self, orthanc: DicomWebClient, config: RouteConfig):
        self.orthanc = orthanc
        self.config = config

    def discover(self, state: RouteState) -> int:
        found = 0
        while True:
            body = self.orthanc.get(
                "changes", {"since": str(state.changes_since), "limit": str(_CHANGES_PAGE)}
            )
            page = json.loads(body)
            for change in page.get("Changes", []):
                if change.get("ChangeType") != "NewInstance":
                    continue
                try:
                    tags = json.loads(self.orthanc.get(f"instances/{change['ID']}/simplified-tags"))
                except PacsRefusedError as exc:
                    if exc.status != 404 or isinstance(exc, CredentialsRefusedError):
                        raise
                    continue  # deleted since
                if tags.get("Modality") not in self.config.modalities:
                    continue
                if tags.get("Manufacturer") == _RESULT_MANUFACTURER:
                    continue
                ref = InstanceRef(
                    tags["StudyInstanceUID"], tags["SeriesInstanceUID"], tags["SOPInstanceUID"]
                )
                state.add_pending(ref)
                found += 1
            # pending is saved before the cursor is, so a crash in between repeats, never loses
            state.save()
            state.changes_since = int(page.get("Last", state.changes_since))
            state.save()
            if page.get("Done", True):
                return found


class StudyList:
    """An explicit list of studies (one-shot mode): every instance of a routed modality, seen
    before or not (a new model version adds its results; a done one is not stored again)."""

    def __init__(self, pacs: DicomWebClient, config: RouteConfig, studies: list[str]):
        self.pacs = pacs
        self.config = config
        self.studies = studies

    def discover(self, state: RouteState) -> int:
        found = 0
        for study in self.studies:
            for ref in study_instances(
                self.pacs, study, self.config.modalities, self.config.pacs.page_size
            ):
                state.add_pending(ref)
                found += 1
        return found


# --- the router -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """The model version that answers now: what each result is tagged with and keyed by."""

    name: str
    version: int
    digest: str


def served_model_version(server: str, target: ModelTarget, timeout: float) -> int:
    """The version the server answers `target` with (GetModelMetadata), without predicting."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = target.name
    if target.version is not None:
        request.model_spec.version.value = target.version
    elif target.label:
        request.model_spec.version_label = target.label
    request.metadata_field.append("signature_def")
    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.GetModelMetadata(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise ServerUnavailableError(
                f"the model server at {server} did not say which version of {target.name} it "
                f"serves ({exc.code().name}: {exc.details() or ''})"
            ) from None
    return int(response.model_spec.version.value)


def serving_digest(model_base_path: str, model_name: str, version: int) -> str:
    """The served version's digest: its release record's, else its SavedModel's when the folder
    is local; "unknown" when neither can be read (the result then says so)."""
    from tumorflow.core import serving_layout, storage

    if not model_base_path:
        return "unknown"
    folder = serving_layout.version_uri(model_base_path, model_name, version)
    record = serving_layout.asset_uri(folder, serving_layout.RELEASE_RECORD)
    try:
        data, _ = storage.read_versioned(record)
        if data:
            digest = json.loads(data).get("serving_digest")
            if digest:
                return str(digest)
    except (OSError, ValueError, SourceUnavailableError):
        pass
    if not storage.is_remote(folder) and Path(folder).is_dir():
        from tumorflow.components.training.export import saved_model_digest

        return "sha256:" + saved_model_digest(Path(folder))
    return "unknown"


@dataclass
class PassResult:
    """What one pass did (instances), and the backlog it left."""

    discovered: int = 0
    routed: int = 0
    already_stored: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    dead_letters_stored: int = 0
    pending: int = 0
    dead_letter: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = (
            f"{self.discovered} new, {self.routed} routed, {self.already_stored} already in the "
            f"PACS, {self.skipped} skipped, {self.dead_lettered} dead-lettered, "
            f"{self.dead_letters_stored} dead letters stored; backlog: {self.pending} pending, "
            f"{self.dead_letter} dead letters"
        )
        return text + "".join(f"\n  {problem}" for problem in self.problems)


@dataclass
class _Fetched:
    ref: InstanceRef
    header: Any
    image: bytes


class PacsRouter:
    """Routes the PACS's new images through the model server and stores results back."""

    def __init__(
        self,
        config: RouteConfig,
        dicom: DicomConfig,
        model_name: str,
        state: RouteState,
        pacs: DicomWebClient,
        *,
        watcher: Any = None,
        metrics: RouterMetrics | None = None,
        model_base_path: str = "",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.dicom = dicom
        self.target = ModelTarget(model_name, None, config.version_label or None)
        self.state = state
        self.pacs = pacs
        self.watcher = watcher
        self.metrics = metrics or RouterMetrics()
        self.model_base_path = model_base_path
        self.clock = clock
        self._digests: dict[int, str] = {}

    # -- the pass --

    def run_pass(self) -> PassResult:
        result = PassResult()
        self.retry_dead_letters(result)
        if self.watcher is not None:
            try:
                result.discovered = self.watcher.discover(self.state)
            except CredentialsRefusedError:
                raise
            except SourceUnavailableError as exc:
                self.metrics.failed.inc()
                result.problems.append(f"finding new instances failed: {exc}")
            self.state.save()
        keep_days = self.config.lookback_days + STATE_RETENTION_MARGIN_DAYS
        forgotten = self.state.prune(keep_days)
        if forgotten:
            logger.info(
                "route state: forgot %d instances not seen for %d days", forgotten, keep_days
            )
        self.route_pending(result)
        return self._finish(result)

    def _finish(self, result: PassResult) -> PassResult:
        self.state.save()
        self.metrics.update_backlog(self.state)
        result.pending = len(self.state.pending)
        result.dead_letter = len(self.state.dead_letter)
        return result

    def served_model(self) -> ServedModel:
        version = served_model_version(
            self.config.model_server, self.target, self.config.timeout_seconds
        )
        if version not in self._digests:
            self._digests[version] = serving_digest(self.model_base_path, self.target.name, version)
        return ServedModel(self.target.name, version, self._digests[version])

    def route_pending(self, result: PassResult) -> None:
        if not self.state.pending:
            return
        try:
            model = self.served_model()
        except ServerUnavailableError as exc:
            self._leave_pending(list(self.state.pending), str(exc), result)
            return
        waiting = list(self.state.pending.values())
        for start in range(0, len(waiting), self.config.batch_size):
            batch = [_ref(entry) for entry in waiting[start : start + self.config.batch_size]]
            if not self._route_batch(batch, model, result):
                rest = [entry["sop"] for entry in waiting[start + self.config.batch_size :]]
                self._leave_pending(rest, "not tried: the model server is unavailable", result)
                return

    def _leave_pending(self, sops: list[str], reason: str, result: PassResult) -> None:
        for sop in sops:
            entry = self.state.pending.get(sop)
            if entry is not None:
                entry["attempts"] = int(entry.get("attempts", 0)) + 1
                entry["reason"] = reason
        if sops:
            self.metrics.failed.inc()
            result.problems.append(f"{len(sops)} instance(s) stay pending: {reason}")
        self.state.save()

    def _skip(self, sop: str, reason: str, result: PassResult) -> None:
        logger.warning("skipping instance %s: %s", sop, reason)
        self.state.record_skipped(sop, reason)
        self.metrics.skipped.inc()
        result.skipped += 1
        self.state.save()

    def _route_batch(
        self, batch: list[InstanceRef], model: ServedModel, result: PassResult
    ) -> bool:
        """Fetch, predict and store one batch; False when the model server is unavailable."""
        fetched: list[_Fetched] = []
        for ref in batch:
            if done_key(ref.sop, model.name, model.version) in self.state.done:
                self.state.pending.pop(ref.sop, None)
                continue
            try:
                data = self.pacs.retrieve_instance(ref.study, ref.series, ref.sop)
            except CredentialsRefusedError:
                raise
            except SourceUnavailableError as exc:
                self._leave_pending([ref.sop], f"fetch failed: {exc}", result)
                continue
            try:
                header = read_dataset(data)
                slices = decode_slices(header, self.dicom)
            except (DicomDecodeError, ValueError) as exc:
                self._skip(ref.sop, f"not a decodable image: {exc}", result)
                continue
            if not slices:
                self._skip(ref.sop, "no image frames", result)
                continue
            # a multi-frame instance is classified on its middle frame
            fetched.append(_Fetched(ref, header, png_bytes(slices[len(slices) // 2])))
        if not fetched:
            return True
        predict = explain_grpc if self.config.secondary_capture else predict_grpc
        try:
            answers = predict_each(
                predict,
                self.config.model_server,
                [item.image for item in fetched],
                self.target,
                timeout=self.config.timeout_seconds,
            )
        except ServerUnavailableError as exc:
            self._leave_pending([item.ref.sop for item in fetched], str(exc), result)
            return False
        built = []
        for item, answer in zip(fetched, answers, strict=True):
            if isinstance(answer, RequestRejectedError):
                self._skip(item.ref.sop, f"the model server refused the image: {answer}", result)
                continue
            prediction = answer.prediction if isinstance(answer, ExplainedPrediction) else answer
            if not prediction.in_distribution:
                # no clinical result for an image the model's OOD detector flags
                self._skip(item.ref.sop, prediction.label, result)
                continue
            built.append((item, *self._build_result(item, answer, model)))
        self._store_results(built, result)
        return True

    def _build_result(
        self, item: _Fetched, answer: ImagePrediction | ExplainedPrediction, model: ServedModel
    ) -> tuple[str, list]:
        """The done key and the objects (SR, and the capture with an explained answer)."""
        prediction_answer = answer.prediction if isinstance(answer, ExplainedPrediction) else answer
        version = prediction_answer.model_version or model.version
        prediction = Prediction(
            predicted_class=prediction_answer.predicted_class,
            probabilities=prediction_answer.probabilities,
            model_name=model.name,
            served_version=str(version),
            serving_digest=self._digests.get(version, model.digest),
            time=self.clock(),
        )
        objects = [prediction_report(item.header, prediction)]
        if isinstance(answer, ExplainedPrediction):
            from tumorflow.components.evaluation.overlays import overlay_heatmap

            overlay = overlay_heatmap(item.image, answer.heatmap)
            objects.append(overlay_capture(item.header, prediction, overlay))
        return done_key(item.ref.sop, model.name, version), objects

    def _store_results(self, built: list[tuple[_Fetched, str, list]], result: PassResult) -> None:
        """Store the results the PACS lacks, in one STOW-RS request; a result the PACS does
        not take becomes a dead letter."""
        to_store = []
        try:
            for item, key, objects in built:
                if self._in_pacs(item.ref.study, [o.SOPInstanceUID for o in objects]):
                    self.state.record_done(key, objects[0].SOPInstanceUID)
                    self.state.pending.pop(item.ref.sop, None)
                    self.metrics.already_stored.inc()
                    result.already_stored += 1
                else:
                    to_store.append((item, key, objects))
            refused = self._stow([report_bytes(o) for _, _, objects in to_store for o in objects])
        except CredentialsRefusedError:
            raise
        except SourceUnavailableError as exc:
            # the results not yet found in the PACS, nor about to be stored, are failed too
            handled = {key for _, key, _ in to_store} | set(self.state.done)
            to_store += [entry for entry in built if entry[1] not in handled]
            refused = {o.SOPInstanceUID: str(exc) for _, _, objects in to_store for o in objects}
        for item, key, objects in to_store:
            self.state.pending.pop(item.ref.sop, None)
            reasons = [refused[o.SOPInstanceUID] for o in objects if o.SOPInstanceUID in refused]
            if reasons:
                self._dead_letter(item.ref, key, objects, reasons[0], result)
            else:
                self.state.record_done(key, objects[0].SOPInstanceUID)
                self.metrics.routed.inc()
                result.routed += 1
        self.state.save()

    def _in_pacs(self, study: str, sop_uids: list[str]) -> bool:
        """Whether every one of these objects is in the study already (QIDO-RS by UID, one
        query each: not every server matches a list of UIDs)."""
        for uid in sop_uids:
            found = self.pacs.get(
                f"studies/{study}/instances", {"SOPInstanceUID": uid}, "application/dicom+json"
            )
            items = json.loads(found) if found.strip() else []
            if uid not in {_value(item, _SOP_UID) for item in items}:
                return False
        return True

    def _stow(self, objects: list[bytes]) -> dict[str, str]:
        """STOW-RS the objects in one request; the UIDs the PACS refused, with the reason."""
        if not objects:
            return {}
        answer = self.pacs.store(objects)
        failed = (answer.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []
        return {
            _value(item, "00081155"): f"the PACS refused it (STOW-RS failure reason "
            f"{_value(item, _FAILURE_REASON) or 'not given'}); see docs/pacs.md"
            for item in failed
        }

    def _dead_letter(
        self, ref: InstanceRef, key: str, objects: list, reason: str, result: PassResult
    ) -> None:
        folder = self.state.dead_letter_dir
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for obj in objects:
            path = folder / f"{obj.SOPInstanceUID}.dcm"
            path.write_bytes(report_bytes(obj))
            files.append(path.name)
        uid = objects[0].SOPInstanceUID
        entry = self.state.dead_letter.get(uid, {**_ref_dict(ref), "key": key, "attempts": 0})
        entry.update(files=files, reason=reason, attempts=int(entry.get("attempts", 0)) + 1)
        self.state.dead_letter[uid] = entry
        logger.warning("result %s for instance %s is a dead letter: %s", uid, ref.sop, reason)
        self.metrics.failed.inc()
        self.metrics.dead_lettered.inc()
        result.dead_lettered += 1
        result.problems.append(f"dead letter {uid}: {reason}")
        self.state.save()

    def retry_dead_letters(self, result: PassResult | None = None) -> PassResult:
        """Store the dead letters again (their files, as first built); the ones stored now, or
        found in the PACS, are done."""
        result = result or PassResult()
        folder = self.state.dead_letter_dir
        for uid, entry in list(self.state.dead_letter.items()):
            files = [folder / name for name in entry.get("files", [])]
            try:
                objects = [path.read_bytes() for path in files]
            except OSError as exc:
                entry["reason"] = f"its files cannot be read ({exc}); route the source again"
                continue
            try:
                uids = [path.stem for path in files]
                if not self._in_pacs(entry["study"], uids):
                    refused = self._stow(objects)
                    if refused:
                        raise PacsRefusedError(next(iter(refused.values())), 409)
                    self.metrics.routed.inc()
            except CredentialsRefusedError:
                raise
            except SourceUnavailableError as exc:
                entry.update(reason=str(exc), attempts=int(entry.get("attempts", 0)) + 1)
                self.metrics.failed.inc()
                result.problems.append(f"dead letter {uid} not stored: {exc}")
                self.state.save()
                continue
            self.state.record_done(entry["key"], uid)
            del self.state.dead_letter[uid]
            for path in files:
                path.unlink(missing_ok=True)
            result.dead_letters_stored += 1
            self.state.save()
        return self._finish(result)

    def run_forever(self, stop: threading.Event, on_pass: Callable[[PassResult], None]) -> None:
        """A pass every `poll_seconds` until `stop` is set; a failed pass is reported and the
        next one tried, except refused credentials, which stop the router."""
        while not stop.is_set():
            started = time.monotonic()
            on_pass(self.run_pass())
            stop.wait(max(0.0, self.config.poll_seconds - (time.monotonic() - started)))


# --- assembly ---------------------------------------------------------------------------------


def orthanc_root(config: RouteConfig) -> str:
    """Orthanc's REST root: route.orthanc_url, else the DICOMweb root without its last segment."""
    if config.orthanc_url:
        return config.orthanc_url.rstrip("/")
    return config.dicomweb_url.rstrip("/").rsplit("/", 1)[0]


def pacs_clients(
    config: RouteConfig, environ: Mapping[str, str]
) -> tuple[DicomWebClient, DicomWebClient]:
    """(DICOMweb client, Orthanc REST client) with the route's login and limits."""
    if not config.dicomweb_url:
        raise ConfigError(
            "route.dicomweb_url is not set: give the PACS's DICOMweb root "
            "(--set route.dicomweb_url=http://pacs:8042/dicom-web)"
        )
    authorization = authorization_header(config.pacs, environ, settings="route.pacs")

    def client(url: str) -> DicomWebClient:
        return DicomWebClient(
            url,
            authorization,
            timeout=config.pacs.timeout_seconds,
            retries=config.pacs.retries,
            backoff=config.pacs.backoff_seconds,
            settings="route.pacs",
        )

    return client(config.dicomweb_url), client(orthanc_root(config))


def build_router(
    config: RouteConfig,
    dicom: DicomConfig,
    model_name: str,
    state_file: str | Path,
    *,
    studies: list[str] | None = None,
    model_base_path: str = "",
    environ: Mapping[str, str] | None = None,
    metrics: RouterMetrics | None = None,
) -> PacsRouter:
    """A router for `config`: an explicit list of studies, else the configured watcher."""
    pacs, orthanc = pacs_clients(config, os.environ if environ is None else environ)
    if studies:
        watcher: Any = StudyList(pacs, config, studies)
    elif config.watch == "orthanc-changes":
        watcher = OrthancChanges(orthanc, config)
    else:
        watcher = QidoPolling(pacs, config, lambda: datetime.now(UTC).date())
    return PacsRouter(
        config,
        dicom,
        model_name,
        RouteState.load(Path(state_file)),
        pacs,
        watcher=watcher,
        metrics=metrics,
        model_base_path=model_base_path,
    )
