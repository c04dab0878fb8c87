"""covidcxr in a hospital, against a real PACS (Orthanc with DICOMweb, tests/orthanc.py): `pacs watch` scores each
chest radiograph once and stores an SR in its study, skips a CT, survives a PACS that goes away; `pacs listen` takes a
C-STORE and sends the SR back by C-STORE, also when the PACS was down as the image came."""

from __future__ import annotations

import io
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE

from conftest import run_cli, start_cli, xray
from covidcxr import cli
from covidcxr.deploy.predict import Predictor
from covidcxr.deploy.serve.log import PredictionLog
from covidcxr.errors import InputError
from covidcxr.hospital.pacs import TOKEN_ENV, Dicomweb, PacsUnavailable, authorize
from covidcxr.hospital.state import MAX_ATTEMPTS, State
from covidcxr.hospital.watch import Watcher, study_date_range
from covidcxr.trust.gate import REASONS
from orthanc import Orthanc
from servers import free_port

pytestmark = pytest.mark.slow
SR_MODALITY = "SR"


def dicom_image(modality: str, sop_class: str, seed: int, pixels: bool = True, turns: int = 0, **tags) -> Dataset:
    """A small radiograph-like DICOM image (a toy chest X-ray, 12 bit) with the patient and study attributes a
    modality writes; pixels=False leaves the pixel data out (unreadable for scoring); `turns` quarter turns
    counter-clockwise (what the gate refuses)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.SOPClassUID = sop_class, sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Test^{seed}", f"P{seed}", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260102", "101500", f"A{seed}", "1"
    ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", modality, 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    image = np.ascontiguousarray(np.rot90(xray(np.random.default_rng(seed), covid=seed % 2 == 0) * 4095, turns))
    image = image.astype(np.uint16)
    ds.Rows, ds.Columns = image.shape
    if pixels:
        ds.PixelData = image.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Background:
    """A CLI process left running, its output lines collected as they come."""

    def __init__(self, *args: str):
        self.lines: list[str] = []
        # Ctrl-C's signal as a terminal delivers it: a shell's background job (e.g. a suite run with `&`) starts its
        # children with SIGINT ignored, and Python keeps an ignored SIGINT ignored
        self.process = start_cli(*args, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if found:
                return found[0]
            assert self.process.poll() is None, "".join(self.lines)
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.lines)}")

    def interrupt(self) -> int:
        """Ctrl-C, as a person stops it; the exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(30)


def studied(server: Orthanc, study_uid: str) -> list[Dataset]:
    """Every instance of one study in the PACS."""
    return [pydicom.dcmread(io.BytesIO(data)) for data in server.study_instances(study_uid)]


def reports(server: Orthanc, study_uid: str) -> list[Dataset]:
    return [ds for ds in studied(server, study_uid) if ds.Modality == SR_MODALITY]


def items(sr: Dataset) -> dict[str, Dataset]:
    """The SR's content items by concept name."""
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}


def assert_report(sr: Dataset, image: Dataset, predictor: Predictor, image_path: Path) -> None:
    """The SR is in the image's study and says what `covidcxr predict` says of the same file."""
    expected = predictor.predict_paths([image_path])[0]
    content = items(sr)
    assert sr.StudyInstanceUID == image.StudyInstanceUID and sr.PatientID == image.PatientID
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    probability = content["Probability of COVID-19"].MeasuredValueSequence[0]
    assert probability.FloatingPointValue == pytest.approx(expected.probability, abs=1e-6)
    assert 0 <= float(probability.NumericValue) <= 1
    threshold = float(content["Decision threshold"].MeasuredValueSequence[0].FloatingPointValue)
    assert threshold == pytest.approx(predictor.threshold)
    verdict = content["Qualitative Evaluations"].ConceptCodeSequence[0].CodeMeaning
    assert verdict == ("COVID-19 suspected" if expected.probability >= threshold else "COVID-19 not suspected")
    assert content["Algorithm Name"].TextValue == predictor.model_id
    assert content["Algorithm Version"].TextValue in predictor.model_id
    assert content["Source of Measurement"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert "not a medical device" in content["Comment"].TextValue


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


def test_watch_scores_each_chest_radiograph_once_and_skips_the_rest(tiny_run, predictor, orthanc, tmp_path):
    chest = dicom_image("CR", ComputedRadiographyImageStorage, seed=1, BodyPartExamined="CHEST")
    ct = dicom_image("CT", CTImageStorage, seed=2)
    blank = dicom_image("CR", ComputedRadiographyImageStorage, seed=3, pixels=False)
    turned = dicom_image("CR", ComputedRadiographyImageStorage, seed=4, turns=2)  # upside down: the gate refuses it
    for ds in (chest, ct, blank, turned):
        orthanc.upload(to_bytes(ds))
    state = tmp_path / "state.sqlite"
    watch = ["pacs", "watch", str(tiny_run), "--url", orthanc.dicomweb, "--once", "--state", str(state), "--cam",
             "--keep-images", str(tmp_path / "kept")]

    first = run_cli(*watch)
    assert first.returncode == 1, first.stderr  # the image without pixels could not be scored
    assert "Traceback" not in first.stderr
    assert f"cannot score {blank.SOPInstanceUID}: DICOM file has no pixel data" in first.stderr
    assert f"scored {chest.SOPInstanceUID}" in first.stderr and f"skipped {ct.SOPInstanceUID}" in first.stderr
    daemon_line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO scored "  # a daemon's log lines carry a timestamp
    assert re.search(daemon_line, first.stderr, re.M)

    found = reports(orthanc, chest.StudyInstanceUID)
    assert len(found) == 1
    image_path = tmp_path / "chest.dcm"
    image_path.write_bytes(to_bytes(chest))
    assert_report(found[0], chest, predictor, image_path)
    assert reports(orthanc, ct.StudyInstanceUID) == [] and reports(orthanc, blank.StudyInstanceUID) == []
    assert reports(orthanc, turned.StudyInstanceUID) == []  # no finding for a refused instance
    assert f"refused {turned.SOPInstanceUID}: {REASONS['rotated_180']}" in first.stderr
    captures = [ds for ds in studied(orthanc, chest.StudyInstanceUID) if ds.SOPClassUID == SecondaryCaptureImageStorage]
    assert len(captures) == 1 and captures[0].PatientID == chest.PatientID
    overlay = captures[0].pixel_array
    assert overlay.ndim == 3 and overlay.shape[2] == 3 and overlay.std() > 0  # the Grad-CAM colours on the X-ray

    with sqlite3.connect(state) as db:
        rows = {uid: (status, reason) for uid, status, reason in
                db.execute("SELECT sop_instance_uid, status, reason FROM instances")}
    assert rows[chest.SOPInstanceUID][0] == "scored"
    assert rows[ct.SOPInstanceUID] == ("skipped", "modality CT is not a radiograph (CR/DX/DR)")
    assert rows[blank.SOPInstanceUID] == ("failed", "DICOM file has no pixel data")
    assert rows[turned.SOPInstanceUID] == ("refused", REASONS["rotated_180"])
    assert rows[found[0].SOPInstanceUID][0] == "output"
    assert_logged_for_the_loop(state, chest, ct, blank, tmp_path)

    count = requests.get(f"{orthanc.url}/statistics", timeout=10).json()["CountInstances"]
    second = run_cli(*watch)
    assert second.returncode == 0, second.stderr
    assert "scored" not in second.stderr and "skipped" not in second.stderr and "cannot score" not in second.stderr
    assert requests.get(f"{orthanc.url}/statistics", timeout=10).json()["CountInstances"] == count


def assert_logged_for_the_loop(state: Path, chest, ct, blank, tmp_path: Path) -> None:
    """The state file holds the prediction log: each instance with its UIDs (the scored one kept), so a verdict from
    a report finds it by SOP Instance UID and `feedback export` makes a data set of it with its patient id."""
    logged = {r.sop_uid: r for r in PredictionLog(state).records()}
    assert (logged[chest.SOPInstanceUID].status, logged[chest.SOPInstanceUID].patient_id) == ("scored",
                                                                                            chest.PatientID)
    assert logged[chest.SOPInstanceUID].study_uid == chest.StudyInstanceUID
    assert Path(logged[chest.SOPInstanceUID].image_path).parent == tmp_path / "kept"
    assert (logged[ct.SOPInstanceUID].status, logged[ct.SOPInstanceUID].reason) == (
        "refused", "modality CT is not a radiograph (CR/DX/DR)")
    assert (logged[blank.SOPInstanceUID].status, logged[blank.SOPInstanceUID].reason) == (
        "unreadable", "DICOM file has no pixel data")
    (tmp_path / "reports.csv").write_text(f"sop_instance_uid,label\n{chest.SOPInstanceUID},covid\n")
    assert run_cli("feedback", "import", state, tmp_path / "reports.csv").returncode == 0
    exported = run_cli("feedback", "export", state, "--out", tmp_path / "site")
    assert exported.returncode == 0, exported.stderr
    rows = pd.read_csv(tmp_path / "site" / "images" / "metadata.csv").to_dict("records")
    assert [(r["label"], r["patient_id"]) for r in rows] == [("covid", chest.PatientID)]


def test_watch_of_a_dead_pacs_retries_then_exits_2_in_one_line_without_the_token(tiny_run, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    code = cli.main(["pacs", "watch", str(tiny_run), "--url", url, "--once", "--state", str(tmp_path / "s.sqlite"),
                     "--retries", "2", "--backoff", "0.1"])
    out, err = capsys.readouterr()
    assert code == 2 and "s3cret" not in out + err
    lines = err.strip().splitlines()
    assert "INFO watching " in lines[0]  # the daemon's log, timestamped
    assert [re.search(r"WARNING PACS at .* retry (\d)/2 in ", line)[1] for line in lines[1:-1]] == ["1", "2"]
    assert lines[-1].startswith(f"covidcxr: error: PACS at {url} unreachable (no connection)")


def test_a_watcher_picks_up_where_it_was_when_the_pacs_comes_back(predictor, orthanc, tmp_path, capsys):
    """Orthanc stops mid-watch: the poll says so after its retries; once it is back, the next poll scores the image
    (the continuous watch catches PacsUnavailable and polls again, see run_watch)."""
    watcher = Watcher(Dicomweb(orthanc.dicomweb, retries=1, backoff_s=0.1), predictor, State(tmp_path / "s.sqlite"))
    assert watcher.poll() == []
    orthanc.stop()
    with pytest.raises(PacsUnavailable, match="unreachable"):
        watcher.poll()
    assert "retry 1/1" in capsys.readouterr().err
    orthanc.start()
    chest = dicom_image("DX", "1.2.840.10008.5.1.4.1.1.1.1", seed=4)  # Digital X-Ray Image Storage
    orthanc.upload(to_bytes(chest))
    assert [r.status for r in watcher.poll()] == ["scored"]
    assert len(reports(orthanc, chest.StudyInstanceUID)) == 1
    assert [r.status for r in watcher.poll()] == []


def test_listen_takes_a_c_store_and_sends_the_report_back_by_c_store(tiny_run, predictor, orthanc, tmp_path):
    """Through the CLI; Orthanc is down when the image arrives: the listener keeps it and delivers once it is back."""
    port = free_port()
    listen = Background("pacs", "listen", str(tiny_run), "--port", str(port), "--ae-title", "COVIDCXR",
                        "--store-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                        "--state", str(tmp_path / "s.sqlite"), "--retries", "1", "--backoff", "0.2")
    chest = dicom_image("CR", ComputedRadiographyImageStorage, seed=5)
    try:
        listen.wait_for(r" INFO listening on ")
        orthanc.stop()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDCXR")
        assert assoc.is_established
        assert assoc.send_c_store(chest).Status == 0x0000
        assoc.release()
        listen.wait_for(rf"unreachable .*; keeping {chest.SOPInstanceUID} to try again")
        orthanc.start()
        listen.wait_for(rf"scored {chest.SOPInstanceUID}")
    finally:
        code = listen.interrupt()
    output = "".join(listen.lines)
    assert code == 130 and "Traceback" not in output and "Association" not in output  # our lines, not pynetdicom's
    found = reports(orthanc, chest.StudyInstanceUID)
    assert len(found) == 1
    image_path = tmp_path / "chest.dcm"
    image_path.write_bytes(to_bytes(chest))
    assert_report(found[0], chest, predictor, image_path)


def test_since_must_be_a_date():
    assert study_date_range("2026-01-02") == {"StudyDate": "20260102-"}
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        study_date_range("yesterday")


def test_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    session = requests.Session()
    authorize(session)
    assert session.headers["Authorization"] == "Bearer from-env"
    creds = tmp_path / "creds.json"
    creds.write_text('{"username": "radiology", "password": "pw"}')
    session = requests.Session()
    authorize(session, creds)
    assert session.auth.username == "radiology" and "Authorization" not in session.headers
    creds.write_text("user:pw")
    with pytest.raises(InputError, match="creds.json"):
        authorize(requests.Session(), creds)


def test_a_refused_instance_is_tried_again_then_given_up(tmp_path):
    state = State(tmp_path / "s.sqlite")
    assert [state.postpone("1.2.3", "1.2", "HTTP 409 Conflict") for _ in range(MAX_ATTEMPTS)] == \
        [False] * (MAX_ATTEMPTS - 1) + [True]
    assert state.is_final("1.2.3")
    reopened = State(tmp_path / "s.sqlite")  # a restart sees the same
    assert reopened.is_final("1.2.3") and not reopened.is_final("1.2.4")


def test_the_report_carries_the_triage_class_when_the_run_has_one(predictor):
    from covidcxr.deploy.predict import Prediction
    from covidcxr.hospital.sr import TRIAGE, structured_report

    source = dicom_image("CR", ComputedRadiographyImageStorage, 3)
    def items(triage):
        prediction = Prediction("x", "scored", None, 0.2, "normal", 0.5, triage=triage)
        sr = structured_report(source, prediction, predictor.model_id)
        return {i.ConceptNameCodeSequence[0].CodeValue: i for i in sr.ContentSequence}
    assert items("rule-out")[TRIAGE.value].ConceptCodeSequence[0].CodeValue == "RULE-OUT"
    assert TRIAGE.value not in items(None)
