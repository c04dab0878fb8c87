"""The DICOM objects covidcxr writes back into the scored image's study (highdicom).

A Comprehensive SR holds the result as a viewer lists it: the qualitative evaluation "COVID-19 suspected / not
suspected", the probability and the threshold as NUM items in [0, 1], the model (TID 4019 algorithm identification:
name = the run's model id, version = its hash), the out-of-distribution flag where the model has a guard, a
research-use comment and an IMAGE reference to the scored radiograph. `cam_capture` is the optional Grad-CAM overlay as
a Secondary Capture. UIDs are derived from the scored image and the model, so storing a report again (a crash between
the PACS's answer and the state's commit) replaces it instead of adding a second one.
"""

from __future__ import annotations

import numpy as np
from highdicom.sc import SCImage
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from covidcxr.deploy.predict import Prediction

SCHEME = "99COVIDCXR"  # private coding scheme (DICOM and SNOMED have no codes for a screening score); values <= 16
TITLE = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
QUALITATIVE = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # the name TID 1500 uses
SUSPECTED = CodedConcept("SUSPECTED", SCHEME, "COVID-19 suspected")
NOT_SUSPECTED = CodedConcept("NOT-SUSPECTED", SCHEME, "COVID-19 not suspected")
PROBABILITY = CodedConcept("PROBABILITY", SCHEME, "Probability of COVID-19")
THRESHOLD = CodedConcept("THRESHOLD", SCHEME, "Decision threshold")
TRIAGE = CodedConcept("TRIAGE", SCHEME, "Triage class")
TRIAGE_CLASSES = {"rule-out": CodedConcept("RULE-OUT", SCHEME, "Rule-out: COVID-19 not suspected (NPV guarantee)"),
                  "rule-in": CodedConcept("RULE-IN", SCHEME, "Rule-in: COVID-19 suspected (PPV guarantee)"),
                  "needs a reader": CodedConcept("READER", SCHEME, "Needs a reader")}
UNITLESS = CodedConcept("1", "UCUM", "no units")
DISCLAIMER = "covidcxr is a research tool, not a medical device: not for diagnosis or treatment decisions."
MANUFACTURER = "covidcxr"
SR_SERIES_NUMBER, CAM_SERIES_NUMBER = 9901, 9902


def derived_uid(*parts: str) -> str:
    """A UID that is the same every time for the same parts (pydicom hashes them under its root)."""
    return generate_uid(entropy_srcs=list(parts))


PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "ReferringPhysicianName", "AccessionNumber", "StudyID")


def header(source: Dataset) -> Dataset:
    """The radiograph's attributes without its pixels, with the patient and study attributes DICOM requires (type 2:
    present, may be empty) added empty where a modality left them out; highdicom copies them into what it writes."""
    head = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            head.add(element)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in head:
            setattr(head, keyword, "")
    return head


def structured_report(source: Dataset, prediction: Prediction, model_id: str) -> ComprehensiveSR:
    """The screening result for one scored radiograph, in the radiograph's study."""
    assert prediction.probability is not None  # only a scored prediction is reported
    source = header(source)
    items = [
        CodeContentItem(QUALITATIVE, finding(prediction), relationship_type="CONTAINS"),
        NumContentItem(PROBABILITY, prediction.probability, UNITLESS, relationship_type="CONTAINS"),
        NumContentItem(THRESHOLD, prediction.threshold, UNITLESS, relationship_type="CONTAINS"),
        *([CodeContentItem(TRIAGE, TRIAGE_CLASSES[prediction.triage], relationship_type="CONTAINS")]
          if prediction.triage else []),
        ImageContentItem(codes.DCM.SourceOfMeasurement, source.SOPClassUID, source.SOPInstanceUID,
                         relationship_type="CONTAINS"),
        TextContentItem(codes.DCM.Comment, DISCLAIMER, relationship_type="CONTAINS"),
        *AlgorithmIdentification(name=model_id, version=model_id.rsplit("-", 1)[-1]),
    ]
    root = ContainerContentItem(TITLE)
    root.ContentSequence = ContentSequence(items)
    return ComprehensiveSR(
        evidence=[source], content=root, manufacturer=MANUFACTURER, is_complete=True,
        series_instance_uid=derived_uid(source.StudyInstanceUID, model_id, "sr"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, model_id, "sr"), instance_number=_number(source),
        series_description="covidcxr COVID-19 screening (research use only)")


def finding(prediction: Prediction) -> CodedConcept:
    """The qualitative evaluation: suspected at or above the run's threshold (as `covidcxr predict` labels it)."""
    assert prediction.probability is not None  # only a scored prediction is reported
    return SUSPECTED if prediction.probability >= prediction.threshold else NOT_SUSPECTED


def cam_capture(source: Dataset, overlay: np.ndarray, model_id: str) -> SCImage:
    """The Grad-CAM overlay (RGB uint8, what the model saw) as a Secondary Capture in the radiograph's study."""
    source = header(source)
    return SCImage.from_ref_dataset(
        source, np.ascontiguousarray(overlay, dtype=np.uint8), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=_orientation(source), manufacturer=MANUFACTURER,
        series_instance_uid=derived_uid(source.StudyInstanceUID, model_id, "cam"), series_number=CAM_SERIES_NUMBER,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, model_id, "cam"), instance_number=_number(source),
        series_description="covidcxr Grad-CAM (research use only)")


def _orientation(source: Dataset) -> tuple[str, str]:
    """The radiograph's row and column directions; a chest film's usual (L, F) where it does not say."""
    given = list(source.get("PatientOrientation") or [])
    return (str(given[0]), str(given[1])) if len(given) == 2 else ("L", "F")


def _number(source: Dataset) -> int:
    """The scored image's instance number, so a report sorts beside its image."""
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1
