"""A model's answer as DICOM: one Comprehensive SR per prediction, for STOW-RS to the PACS.

`prediction_report` builds the SR for one source instance: the predicted class and every class
probability (NUM items), the model name, served version and serving digest, the time of the
inference, a reference to the source SOP Instance, and a plain statement that it is a research /
decision-support result. It belongs to the source's patient and study (their tags are copied, as
a PACS needs) in a new series. Its Series and SOP Instance UIDs are derived from the source and
the served version, so writing the same result twice gives the same object (a PACS keeps one) and
a new model version gives a new one. Concepts the standard's code tables lack use the local coding
scheme `99TUMORFLOW`.

`overlay_capture` builds the optional companion: a Secondary Capture of the Grad-CAM overlay with
"NOT FOR DIAGNOSIS" burned into the pixels, referencing the same source instance, in a series of
its own (a series holds one modality), with UIDs derived the same way.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

LOCAL_SCHEME = "99TUMORFLOW"
DISCLAIMER = (
    "Research / decision-support result computed by a machine-learning model. It is not a "
    "diagnosis and has not been reviewed by a physician."
)
# Copied from the source so that the report files under the same patient and study.
_PATIENT_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_SERIES_DESCRIPTION = "tumorflow AI result (research)"
_CAPTURE_SERIES_DESCRIPTION = "tumorflow Grad-CAM overlay (not for diagnosis)"
BURNED_IN_NOTE = "NOT FOR DIAGNOSIS - research AI overlay"
# The overlay is enlarged to at least this many pixels across, so that the note is legible.
_CAPTURE_MIN_SIZE = 256
_MANUFACTURER = "tumorflow"


@dataclass(frozen=True)
class Prediction:
    """What the model server said about one image, and which model said it."""

    predicted_class: str
    probabilities: Mapping[str, float]
    model_name: str
    served_version: str
    serving_digest: str
    time: datetime


def _code(value: str, meaning: str, scheme: str = LOCAL_SCHEME) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning[:64]
    return item


def _item(value_type: str, concept: Dataset, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([concept])
    return item


def _text(concept: Dataset, text: str) -> Dataset:
    item = _item("TEXT", concept)
    item.TextValue = text
    return item


def _probability(label: str, value: float) -> Dataset:
    item = _item("NUM", _code(f"P-{label}"[:16], f"Probability of {label}"))
    measured = Dataset()
    measured.NumericValue = f"{value:.6f}"
    measured.MeasurementUnitsCodeSequence = Sequence([_code("1", "no units", "UCUM")])
    item.MeasuredValueSequence = Sequence([measured])
    return item


def _image_reference(source: Dataset) -> Dataset:
    item = _item("IMAGE", _code("121112", "Source of Measurement", "DCM"))
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.ReferencedSOPSequence = Sequence([reference])
    return item


def _evidence(source: Dataset) -> Sequence:
    """CurrentRequestedProcedureEvidenceSequence: the source instance, by study and series."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([instance])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    return Sequence([study])


def result_uids(source: Dataset, prediction: Prediction) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the report: one series per study and served
    model version, one instance per source instance and served model version."""
    version = [prediction.model_name, prediction.served_version, prediction.serving_digest]
    series = generate_uid(entropy_srcs=["series", source.StudyInstanceUID, *version])
    instance = generate_uid(entropy_srcs=["sr", source.SOPInstanceUID, *version])
    return series, instance


def capture_uids(source: Dataset, prediction: Prediction) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the Grad-CAM capture, derived as the report's
    are: one series per study and served version, one instance per source and served version."""
    version = [prediction.model_name, prediction.served_version, prediction.serving_digest]
    series = generate_uid(entropy_srcs=["capture-series", source.StudyInstanceUID, *version])
    instance = generate_uid(entropy_srcs=["capture", source.SOPInstanceUID, *version])
    return series, instance


def prediction_report(source: Dataset, prediction: Prediction) -> Dataset:
    """The Comprehensive SR of `prediction` about the instance `source` (its header suffices)."""
    if prediction.predicted_class not in prediction.probabilities:
        raise ValueError(
            f"predicted class {prediction.predicted_class!r} is not one of the probabilities' "
            f"classes {sorted(prediction.probabilities)}"
        )
    series_uid, sop_uid = result_uids(source, prediction)
    when = prediction.time
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SpecificCharacterSet = "ISO_IR 192"
    report.SOPClassUID = ComprehensiveSRStorage
    report.SOPInstanceUID = sop_uid
    for keyword in _PATIENT_STUDY_TAGS:
        setattr(report, keyword, source.get(keyword, ""))
    report.Modality = "SR"
    report.SeriesInstanceUID = series_uid
    report.SeriesNumber = 9901
    report.SeriesDescription = _SERIES_DESCRIPTION
    report.ReferencedPerformedProcedureStepSequence = Sequence()
    report.Manufacturer = _MANUFACTURER
    report.ManufacturerModelName = prediction.model_name[:64]
    report.SoftwareVersions = prediction.served_version[:64]
    report.InstanceNumber = 1
    report.ContentDate = when.strftime("%Y%m%d")
    report.ContentTime = when.strftime("%H%M%S")
    report.InstanceCreationDate = report.ContentDate
    report.InstanceCreationTime = report.ContentTime
    report.CompletionFlag = "COMPLETE"
    report.VerificationFlag = "UNVERIFIED"
    report.PerformedProcedureCodeSequence = Sequence()
    report.CurrentRequestedProcedureEvidenceSequence = _evidence(source)
    report.ValueType = "CONTAINER"
    report.ConceptNameCodeSequence = Sequence([_code("18748-4", "Diagnostic imaging report", "LN")])
    report.ContinuityOfContent = "SEPARATE"
    observed = _item("DATETIME", _code("111526", "DateTime Started", "DCM"))
    observed.DateTime = when.strftime("%Y%m%d%H%M%S")
    report.ContentSequence = Sequence(
        [
            _text(_code("121106", "Comment", "DCM"), DISCLAIMER),
            _text(_code("PREDICTED", "Predicted class"), prediction.predicted_class),
            *(
                _probability(label, float(value))
                for label, value in prediction.probabilities.items()
            ),
            _text(_code("MODEL", "Model name"), prediction.model_name),
            _text(_code("VERSION", "Served model version"), prediction.served_version),
            _text(_code("DIGEST", "Serving digest"), prediction.serving_digest),
            observed,
            _image_reference(source),
        ]
    )
    return report


def report_bytes(report: Dataset) -> bytes:
    """The Part 10 bytes of a report (what STOW-RS sends)."""
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _burn_in_note(overlay_png: bytes):
    """The overlay as RGB pixels, enlarged to be legible, with BURNED_IN_NOTE on a black band
    along its bottom edge."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    image = Image.open(io.BytesIO(overlay_png)).convert("RGB")
    scale = max(1, -(-_CAPTURE_MIN_SIZE // min(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, image.width // 24))
    _, top, _, bottom = draw.textbbox((0, 0), BURNED_IN_NOTE, font=font)
    band = bottom - top + 8
    draw.rectangle([0, image.height - band, image.width, image.height], fill=(0, 0, 0))
    draw.text((4, image.height - band + 4 - top), BURNED_IN_NOTE, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8)


def overlay_capture(source: Dataset, prediction: Prediction, overlay_png: bytes) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay (PNG bytes, `overlay_heatmap`) of `source`,
    with BURNED_IN_NOTE in its pixels, the source referenced, in the source's study."""
    pixels = _burn_in_note(overlay_png)
    series_uid, sop_uid = capture_uids(source, prediction)
    when = prediction.time
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    capture = Dataset()
    capture.file_meta = meta
    capture.SpecificCharacterSet = "ISO_IR 192"
    capture.SOPClassUID = SecondaryCaptureImageStorage
    capture.SOPInstanceUID = sop_uid
    for keyword in _PATIENT_STUDY_TAGS:
        setattr(capture, keyword, source.get(keyword, ""))
    capture.Modality = "OT"
    capture.SeriesInstanceUID = series_uid
    capture.SeriesNumber = 9902
    capture.SeriesDescription = _CAPTURE_SERIES_DESCRIPTION
    capture.Laterality = source.get("Laterality", "")
    capture.Manufacturer = _MANUFACTURER
    capture.ConversionType = "WSD"
    capture.InstanceNumber = 1
    capture.PatientOrientation = ""
    capture.ContentDate = when.strftime("%Y%m%d")
    capture.ContentTime = when.strftime("%H%M%S")
    capture.InstanceCreationDate = capture.ContentDate
    capture.InstanceCreationTime = capture.ContentTime
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.DerivationDescription = (
        f"Grad-CAM of {prediction.predicted_class} by {prediction.model_name} "
        f"version {prediction.served_version}"
    )[:1024]
    capture.BurnedInAnnotation = "YES"
    capture.ImageComments = DISCLAIMER
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = Sequence([reference])
    capture.SamplesPerPixel = 3
    capture.PhotometricInterpretation = "RGB"
    capture.PlanarConfiguration = 0
    capture.Rows, capture.Columns = pixels.shape[:2]
    capture.BitsAllocated = 8
    capture.BitsStored = 8
    capture.HighBit = 7
    capture.PixelRepresentation = 0
    capture.PixelData = pixels.tobytes()
    return capture
