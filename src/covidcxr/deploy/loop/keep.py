"""What the log keeps of an image beyond its hash: the file itself (with --keep-images), and the DICOM UIDs and patient
id it carried, so imported verdicts find it and `feedback export` can make a data set of it."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pydicom
from PIL import Image

PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
DICOM_IDS = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID",
             "sop_uid": "SOPInstanceUID"}  # log column -> DICOM keyword


def is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def dicom_ids(data: bytes) -> dict[str, str | None]:
    """The patient id and UIDs of a DICOM upload (header only), so imported verdicts and exports can match it."""
    if not is_dicom(data):
        return {}
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(DICOM_IDS.values()))
    except Exception:  # noqa: BLE001 - the decoder says what is wrong with the file; the ids are a courtesy
        return {}
    return dataset_ids(ds)


def dataset_ids(ds: pydicom.Dataset) -> dict[str, str | None]:
    """The patient id and UIDs of a DICOM dataset, as the log's columns."""
    return {key: (str(ds.get(tag)) if ds.get(tag) else None) for key, tag in DICOM_IDS.items()}


def keep_image(data: bytes, digest: str, folder: str | Path) -> str:
    """Keep an uploaded file as it came, named by its hash (one copy per image): `feedback export` makes a data set
    of those that get a verdict."""
    kind = "dcm" if is_dicom(data) else Image.open(io.BytesIO(data), formats=PILLOW_FORMATS).format
    suffix = {"JPEG": "jpg", "TIFF": "tif"}.get(str(kind), str(kind).lower())
    path = Path(folder) / f"{digest}.{suffix}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")  # request threads may race
        part.write_bytes(data)
        part.replace(path)
    return str(path.resolve())
