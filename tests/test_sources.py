"""Each database layout adapter on a miniature copy of its layout (real CSV headers, tiny images)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covidcxr.data.sources import COLUMNS, LABELS, LAYOUTS, detect_layout, load_source
from covidcxr.data.sources._common import age_group

SHARED_CXR = Path(
    os.environ.get("COVIDCXR_SHARED", Path(__file__).resolve().parents[1].parent / "shared" / "cxr")
)

COHEN_HEADER = (
    "patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,other_notes,"
)
FIGURE1_HEADER = (
    "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,originalfile,"
    "artifacts/distortion,notes"
)
ACTUALMED_HEADER = (
    "patientid,offset,sex,age,finding,survival,temperature,pO2 saturation,view,modality,imagename,"
    "artifacts/distortion,notes"
)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def write_image(path: Path, value: int = 128) -> Path:
    """A tiny gray image in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
    return path


def write_dicom(path: Path, view: str, sex: str, age: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    with warnings.catch_warnings():  # RSNA's files carry ages like "45" (no unit), invalid as DICOM AS
        warnings.simplefilter("ignore", UserWarning)
        ds.ViewPosition, ds.PatientSex, ds.PatientAge = view, sex, age
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(16))
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: str, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def build_cohen(tmp: Path) -> Path:
    root = tmp / "covid-chestxray-dataset"
    tail = ",,,,,,,,,,,,,"  # RT_PCR_positive ... lymphocyte_count
    write_csv(
        root / "metadata.csv",
        COHEN_HEADER,
        [
            f"2,0,M,65,Pneumonia/Viral/COVID-19{tail},PA,X-ray,2020,,images,a.jpeg,,,,,,",
            f"2,3,M,65,Pneumonia/Viral/COVID-19{tail},L,X-ray,2020,,images,a-lat.jpeg,,,,,,",
            f"3,1,F,50,Pneumonia/Viral/COVID-19{tail},Axial,CT,2020,,volumes,ct.nii.gz,,,,,,",
            f"4,,F,12,No Finding{tail},AP Supine,X-ray,2020,,images,b.png,,,,,,",
            f"5,,,,Pneumonia/Bacterial/Streptococcus{tail},AP,X-ray,2019,,images,missing.jpg,,,,,,",
            f'6,,M,,Tuberculosis{tail},PA,X-ray,2019,,images,c.jpg,,,,,"notes, with a comma",',
        ],
    )
    for name in ("a.jpeg", "a-lat.jpeg", "b.png", "c.jpg"):
        write_image(root / "images" / name)
    write_image(root / "volumes" / "ct.png")
    return root


def build_figure1(tmp: Path) -> Path:
    root = tmp / "Figure1-COVID-chestxray-dataset"
    write_csv(
        root / "metadata.csv",
        FIGURE1_HEADER,
        [
            "COVID-00001,13,M,33,COVID-19,,,58,AP erect,X-ray,COVID-0001.jpeg,,note",
            "COVID-00003a,8,M,28,Pneumonia,,39.1,90,AP erect,X-ray,COVID-0024.jpeg,,",
            "COVID-00003b,8,M,28,Pneumonia,,39.1,90,AP erect,X-ray,COVID-0025.jpeg,,",
            "COVID-00005,,,,,,,,,X-ray,,,",
            "COVID-00006,,F,50+,No finding,,,,PA,X-ray,,,",
        ],
    )
    write_image(root / "images" / "COVID-00001.jpg")
    write_image(root / "images" / "COVID-00003a.jpg")
    write_image(root / "images" / "COVID-00003b.png")
    write_image(root / "images" / "COVID-00005.jpg")
    return root


def build_actualmed(tmp: Path) -> Path:
    root = tmp / "Actualmed-COVID-chestxray-dataset"
    write_csv(
        root / "metadata.csv",
        ACTUALMED_HEADER,
        [
            'ANON196,,,,,,,,PA,X-ray,CR.1.2.840.1.png,,"Inconclusive, date taken (YYYYMMDD): 20200313"',
            'ANON56,,,,No finding,,,,PA,X-ray,CR.1.2.840.2.png,,"Negative, date taken (YYYYMMDD): 20200317"',
            'ANON196,,,,COVID-19,,,,AP,X-ray,CR.1.2.840.3.png,,", date taken (YYYYMMDD): 20200318"',
            'ANON196,,,,COVID-19,,,,AP,X-ray,CR.1.2.840.4.png,,", date taken (YYYYMMDD): 20200319"',
        ],
    )
    for i in (1, 2, 3, 4):
        write_image(root / "images" / f"CR.1.2.840.{i}.png")
    return root


def build_radiography(tmp: Path) -> Path:
    root = tmp / "COVID-19_Radiography_Dataset"
    for folder in ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"):
        write_image(root / folder / "images" / f"{folder}-1.png")
        write_image(root / folder / "masks" / f"{folder}-1.png", value=255)
        (root / f"{folder}.metadata.xlsx").write_bytes(b"")
    write_image(root / "COVID" / "images" / "COVID-2.png")
    return root


def build_kermany(tmp: Path) -> Path:
    root = tmp / "kermany"
    base = root / "chest_xray"
    write_image(base / "train" / "PNEUMONIA" / "person1_bacteria_1.jpeg")
    write_image(base / "train" / "PNEUMONIA" / "person1_bacteria_2.jpeg")
    write_image(base / "test" / "PNEUMONIA" / "person1_virus_6.jpeg")
    write_image(base / "train" / "NORMAL" / "IM-0115-0001.jpeg")
    write_image(base / "val" / "NORMAL" / "NORMAL2-IM-0135-0001.jpeg")
    write_image(base / "train" / "NORMAL" / "._IM-0115-0001.jpeg")  # macOS resource fork, not an image
    return root


def build_rsna(tmp: Path) -> Path:
    root = tmp / "rsna"
    write_csv(
        root / "stage_2_train_labels.csv",
        "patientId,x,y,width,height,Target",
        ["aaa,264.0,152.0,213.0,379.0,1", "aaa,562.0,152.0,256.0,453.0,1", "bbb,,,,,0", "ccc,,,,,0"],
    )
    write_csv(
        root / "stage_2_detailed_class_info.csv",
        "patientId,class",
        ["aaa,Lung Opacity", "aaa,Lung Opacity", "bbb,Normal", "ccc,No Lung Opacity / Not Normal"],
    )
    write_dicom(root / "stage_2_train_images" / "aaa.dcm", "AP", "M", "45")
    write_dicom(root / "stage_2_train_images" / "bbb.dcm", "PA", "F", "9")
    return root


def build_nih(tmp: Path) -> Path:
    root = tmp / "nih"
    write_csv(
        root / "Data_Entry_2017_v2020.csv",
        NIH_HEADER,
        [
            "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
            "00000001_001.png,Infiltration|Pneumonia,1,1,58,M,AP,2894,2729,0.143,0.143",
            "00000002_000.png,No Finding,0,2,12,F,PA,2500,2048,0.168,0.168",
            "00000003_000.png,No Finding,0,3,81,F,PA,2582,2991,0.143,0.143",
        ],
    )
    write_image(root / "images_001" / "images" / "00000001_000.png")
    write_image(root / "images_002" / "images" / "00000001_001.png")
    write_image(root / "images" / "00000002_000.png")
    return root


def build_montgomery_shenzhen(tmp: Path) -> Path:
    root = tmp / "tb"
    write_image(root / "MontgomerySet" / "CXR_png" / "MCUCXR_0001_0.png")
    write_image(root / "MontgomerySet" / "CXR_png" / "MCUCXR_0104_1.png")
    (root / "MontgomerySet" / "ClinicalReadings").mkdir()
    (root / "MontgomerySet" / "ClinicalReadings" / "MCUCXR_0001_0.txt").write_text(
        "Patient's Sex: F\nPatient's Age: 040Y\nnormal\n"
    )
    write_image(root / "ChinaSet_AllFiles" / "CXR_png" / "CHNCXR_0327_1.png")
    (root / "ChinaSet_AllFiles" / "ClinicalReadings").mkdir()
    (root / "ChinaSet_AllFiles" / "ClinicalReadings" / "CHNCXR_0327_1.txt").write_text(
        "male 9yrs\nPTB in the left upper field\n"
    )
    return root


def build_folders(tmp: Path) -> Path:
    root = tmp / "myhospital"
    write_image(root / "COVID-19" / "x1.png")
    write_image(root / "Normal" / "x2.jpg")
    write_image(root / "viral_pneumonia" / "batch1" / "x3.jpeg")
    write_image(root / "Effusion" / "x4.png")
    return root


def build_csv(tmp: Path) -> Path:
    root = tmp / "mydata"
    write_csv(
        root / "metadata.csv",
        "path,label,patient_id,view,sex",
        [
            "img/a.png,covid,p1,PA,female",
            "img/b.png,normal,p1,,M",
            "img/c.png,pneumonia,,AP,",
            "img/d.png,other,p2,,",
        ],
    )
    for name in "abc":
        write_image(root / "img" / f"{name}.png")
    return root


def build_covidx(tmp: Path) -> Path:
    root = tmp / "COVIDx"
    write_image(root / "train" / "a.png")
    write_image(root / "train" / "b.jpg")
    write_image(root / "test" / "c.png")
    (root / "train_COVIDx9A.txt").write_text(
        "17 a.png COVID-19 cohen\n18 b.jpg pneumonia rsna\n19 gone.png normal rsna\n")
    (root / "test_COVIDx9A.txt").write_text("p7 c.png negative ricord\np8 d.png fracture ricord\n")
    return root


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "covidx": build_covidx,
    "cohen": build_cohen,
    "figure1": build_figure1,
    "actualmed": build_actualmed,
    "radiography": build_radiography,
    "kermany": build_kermany,
    "rsna": build_rsna,
    "nih": build_nih,
    "montgomery_shenzhen": build_montgomery_shenzhen,
    "folders": build_folders,
    "csv": build_csv,
}


def by_name(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {Path(p).name: row for p, (_, row) in zip(df["path"], df.iterrows())}


def test_every_layout_has_a_miniature():
    assert set(BUILDERS) == set(LAYOUTS)


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_miniature_is_detected_as_itself_and_meets_the_contract(tmp_path, layout):
    root = BUILDERS[layout](tmp_path)
    assert detect_layout(root) == layout
    df, chosen = load_source(root)
    assert chosen == layout
    assert tuple(df.columns) == COLUMNS
    assert set(df["label"]) <= set(LABELS)
    assert set(df["age_group"]) <= {"adult", "pediatric", "unknown"}
    assert set(df["sex"]) <= {"M", "F", ""}
    assert all(os.path.isabs(p) for p in df["path"])
    assert all(pid.startswith(f"{src}:") for pid, src in zip(df["patient_id"], df["source"]))
    assert (df["view"] != "").all()


def test_cohen_keeps_frontal_xrays_and_maps_findings(tmp_path):
    root = build_cohen(tmp_path)
    df, _ = load_source(root, "cohen")
    rows = by_name(df)
    assert set(rows) == {"a.jpeg", "b.png", "missing.jpg", "c.jpg"}  # lateral and CT dropped
    assert {n: r["label"] for n, r in rows.items()} == {
        "a.jpeg": "covid", "b.png": "normal", "missing.jpg": "pneumonia", "c.jpg": "other"
    }
    assert rows["a.jpeg"]["patient_id"] == "cohen:2"
    assert (rows["a.jpeg"]["sex"], rows["a.jpeg"]["age_group"]) == ("M", "adult")
    assert (rows["b.png"]["view"], rows["b.png"]["age_group"]) == ("AP Supine", "pediatric")
    assert rows["c.jpg"]["finding"] == "Tuberculosis"
    assert rows["missing.jpg"]["path"] == str(root / "images" / "missing.jpg")  # listed but missing: kept
    assert not Path(rows["missing.jpg"]["path"]).exists()


def test_covidx_reads_both_vocabularies_and_lists_missing_files_and_bad_lines(tmp_path):
    root = build_covidx(tmp_path)
    df, _ = load_source(root)
    rows = by_name(df)
    assert {n: (r["label"], r["source"], r["patient_id"]) for n, r in rows.items() if n != "d.png"} == {
        "a.png": ("covid", "cohen", "cohen:17"), "b.jpg": ("pneumonia", "rsna", "rsna:18"),
        "gone.png": ("normal", "rsna", "rsna:19"), "c.png": ("other", "ricord", "ricord:p7")}
    assert rows["c.png"]["path"] == str(root / "test" / "c.png") and rows["c.png"]["finding"] == "negative"
    assert not Path(rows["gone.png"]["path"]).exists()  # listed but missing: kept, ingest lists it
    bad = df[df["problem"] != ""]
    assert bad[["listed_in", "line", "problem"]].values.tolist() == [
        [str(root / "test_COVIDx9A.txt"), "2", "unknown class 'fracture'"]]


def test_figure1_groups_lettered_images_and_finds_the_extension(tmp_path):
    root = build_figure1(tmp_path)
    df, _ = load_source(root)
    rows = by_name(df)
    # COVID-00005 has no finding: no label, left out; COVID-00006 has no file: kept with the default name
    assert set(rows) == {"COVID-00001.jpg", "COVID-00003a.jpg", "COVID-00003b.png", "COVID-00006.jpg"}
    lettered = {rows["COVID-00003a.jpg"]["patient_id"], rows["COVID-00003b.png"]["patient_id"]}
    assert lettered == {"figure1:COVID-00003"}
    assert [rows[n]["label"] for n in ("COVID-00001.jpg", "COVID-00003a.jpg", "COVID-00006.jpg")] == [
        "covid", "pneumonia", "normal"
    ]
    assert rows["COVID-00006.jpg"]["age_group"] == "adult"  # "50+"


def test_actualmed_drops_inconclusive_rows_and_keeps_patients(tmp_path):
    df, layout = load_source(build_actualmed(tmp_path))
    assert layout == "actualmed"
    assert list(df["label"]) == ["normal", "covid", "covid"]
    assert list(df["patient_id"]) == ["actualmed:ANON56", "actualmed:ANON196", "actualmed:ANON196"]
    assert list(df["view"]) == ["PA", "AP", "AP"]


def test_radiography_uses_images_not_masks(tmp_path):
    df, _ = load_source(build_radiography(tmp_path))
    assert all("/masks/" not in p for p in df["path"])
    assert sorted(zip(df["finding"], df["label"])) == [
        ("COVID", "covid"), ("COVID", "covid"), ("Lung_Opacity", "other"), ("Normal", "normal"),
        ("Viral Pneumonia", "pneumonia"),
    ]
    assert df["patient_id"].is_unique


def test_radiography_old_flat_release(tmp_path):
    root = tmp_path / "COVID-19 Radiography Database"
    write_image(root / "COVID-19" / "COVID-19 (1).png")
    write_image(root / "NORMAL" / "NORMAL (1).png")
    write_image(root / "Viral Pneumonia" / "Viral Pneumonia (1).png")
    df, layout = load_source(root)
    assert layout == "radiography"
    assert sorted(df["label"]) == ["covid", "normal", "pneumonia"]


def test_kermany_patients_and_findings(tmp_path):
    df, _ = load_source(build_kermany(tmp_path))
    rows = by_name(df)
    assert set(rows) == {"person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person1_virus_6.jpeg",
                         "IM-0115-0001.jpeg", "NORMAL2-IM-0135-0001.jpeg"}
    assert {rows[n]["patient_id"] for n in rows if n.startswith("person1")} == {"kermany:person1"}
    assert rows["person1_virus_6.jpeg"]["finding"] == "virus"
    assert rows["person1_bacteria_1.jpeg"]["label"] == "pneumonia"
    assert rows["IM-0115-0001.jpeg"]["patient_id"] == "kermany:IM-0115"
    assert rows["NORMAL2-IM-0135-0001.jpeg"]["patient_id"] == "kermany:NORMAL2-IM-0135"
    assert rows["IM-0115-0001.jpeg"]["label"] == "normal"
    assert set(df["age_group"]) == {"pediatric"}


def test_rsna_one_row_per_image_with_dicom_header(tmp_path):
    root = build_rsna(tmp_path)
    df, _ = load_source(root)
    assert list(df["patient_id"]) == ["rsna:aaa", "rsna:bbb", "rsna:ccc"]
    assert list(df["label"]) == ["pneumonia", "normal", "other"]
    assert list(df["view"]) == ["AP", "PA", "unknown"]  # ccc.dcm is missing: kept, header unknown
    assert list(df["sex"]) == ["M", "F", ""]
    assert list(df["age_group"]) == ["adult", "pediatric", "unknown"]
    assert not Path(df["path"].iloc[2]).exists()


def test_nih_finds_images_in_any_folder(tmp_path):
    root = build_nih(tmp_path)
    df, _ = load_source(root)
    assert list(df["label"]) == ["other", "pneumonia", "normal", "normal"]
    assert list(df["patient_id"]) == ["nih:1", "nih:1", "nih:2", "nih:3"]
    assert df["path"].iloc[1] == str(root / "images_002" / "images" / "00000001_001.png")
    assert [Path(p).exists() for p in df["path"]] == [True, True, True, False]
    assert list(df["age_group"]) == ["adult", "adult", "pediatric", "adult"]
    assert list(df["view"]) == ["PA", "AP", "PA", "PA"]


def test_montgomery_shenzhen_labels_and_readings(tmp_path):
    df, _ = load_source(build_montgomery_shenzhen(tmp_path))
    rows = by_name(df)
    mcu, tb, chn = rows["MCUCXR_0001_0.png"], rows["MCUCXR_0104_1.png"], rows["CHNCXR_0327_1.png"]
    assert (mcu["source"], mcu["label"], mcu["sex"], mcu["age_group"], mcu["finding"]) == (
        "montgomery", "normal", "F", "adult", "normal"
    )
    assert (tb["label"], tb["finding"]) == ("other", "tuberculosis")
    assert (chn["source"], chn["label"], chn["sex"]) == ("shenzhen", "other", "M")
    assert chn["age_group"] == "pediatric"
    assert chn["finding"] == "PTB in the left upper field"
    assert chn["patient_id"] == "shenzhen:CHNCXR_0327_1"


def test_folders_maps_names_and_recurses(tmp_path):
    df, _ = load_source(build_folders(tmp_path))
    assert {Path(p).name: lab for p, lab in zip(df["path"], df["label"])} == {
        "x1.png": "covid", "x2.jpg": "normal", "x3.jpeg": "pneumonia", "x4.png": "other"
    }
    assert set(df["source"]) == {"myhospital"}
    assert "myhospital:viral_pneumonia/batch1/x3" in set(df["patient_id"])


def test_csv_layout_defaults_and_missing_file(tmp_path):
    root = build_csv(tmp_path)
    df, _ = load_source(root)
    assert list(df["patient_id"]) == ["mydata:p1", "mydata:p1", "mydata:img/c.png", "mydata:p2"]
    assert list(df["sex"]) == ["F", "M", "", ""]
    assert list(df["view"]) == ["PA", "unknown", "AP", "unknown"]
    assert set(df["source"]) == {"mydata"}
    assert not Path(df["path"].iloc[3]).exists()  # d.png listed but missing: kept
    same, layout = load_source(root / "metadata.csv")  # a CSV file works as the root too
    assert layout == "csv" and same.equals(df)


@pytest.mark.parametrize(("header", "missing"), [("path,diagnosis", "label"), ("file,label", "path")])
@pytest.mark.parametrize("layout", ["csv", "auto"])
def test_csv_missing_required_column_is_one_clear_error(tmp_path, header, missing, layout):
    write_csv(tmp_path / "metadata.csv", header, ["a.png,covid"])
    with pytest.raises(ValueError) as err:
        load_source(tmp_path, layout)
    message = str(err.value)
    assert str(tmp_path / "metadata.csv") in message and f"'{missing}'" in message and "\n" not in message


def test_csv_bad_rows_carry_their_line_and_reason_and_the_rest_are_kept(tmp_path):
    lines = ["a.png,covid,", "b.png,COVID-ish,", "", " ,normal,", "c.png,normal,elderly", "d.png,Normal,Adult"]
    write_csv(tmp_path / "metadata.csv", "path,label,age_group", lines)  # a blank line 4 still counts

    df, _ = load_source(tmp_path)

    by_line = df.set_index("line")
    assert list(by_line.index) == ["2", "3", "5", "6", "7"]
    assert set(df["listed_in"]) == {str(tmp_path / "metadata.csv")}
    assert by_line.at["3", "problem"] == "label 'covid-ish' is not one of covid, normal, pneumonia, other"
    assert (by_line.at["5", "problem"], by_line.at["5", "path"]) == ("empty path", "")
    assert by_line.at["6", "problem"] == "age_group 'elderly' is not one of adult, pediatric, unknown"
    assert by_line.loc[["2", "7"], "problem"].tolist() == ["", ""]
    assert by_line.at["7", "label"] == "normal" and by_line.at["7", "age_group"] == "adult"


def test_nothing_matches_lists_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError) as err:
        detect_layout(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert all(name in str(err.value) for name in LAYOUTS)


def test_unknown_or_wrong_layout_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'bogus'"):
        load_source(tmp_path, "bogus")
    with pytest.raises(ValueError, match="does not look like the nih layout"):
        load_source(build_cohen(tmp_path), "nih")
    with pytest.raises(ValueError, match="no such file or folder"):
        load_source(tmp_path / "absent")


@pytest.mark.parametrize(
    ("raw", "group"),
    [("45", "adult"), ("058Y", "adult"), ("50+", "adult"), ("17", "pediatric"), ("9 months", "pediatric"),
     ("", "unknown"), ("n/a", "unknown"), ("18", "adult")],
)
def test_age_group(raw, group):
    assert age_group(raw) == group


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_CXR / "metadata.csv").is_file(), reason="../shared/cxr not present")
def test_real_shared_metadata():
    df, layout = load_source(SHARED_CXR)
    assert layout == "csv"
    assert len(df) == 3693
    assert df["label"].value_counts().to_dict() == {"covid": 1998, "normal": 1319, "pneumonia": 376}
    assert df["patient_id"].nunique() == 3185
    assert all(Path(p).is_file() for p in df["path"].iloc[::200])
