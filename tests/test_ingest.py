"""Ingest end to end: bad files listed not fatal, incremental re-runs, duplicates across sources, interruptions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from covidcxr import cli
from covidcxr.config import IngestConfig
from covidcxr.data import ingest as ingest_mod
from covidcxr.data.cache import ImageCache, to_square
from covidcxr.data.ingest import DUPLICATES_FILE, REPORT_FILE, ingest, summarize
from covidcxr.data.reader import read_image

SIZE = 32
CFG = IngestConfig(size=SIZE, workers=2)


def _write_source(root: Path, images, seeds: list[int], source: str = "alpha") -> Path:
    """A folder in the generic CSV layout: one smooth image per seed, labels alternating, one patient each."""
    rows = []
    for seed in seeds:
        rel = f"img/{source}_{seed}.png"
        images.save(root / rel, images.smooth(seed, 60 + seed % 7 * 5, 50))
        rows.append({"path": rel, "label": ("covid", "normal")[seed % 2], "patient_id": f"p{seed}", "source": source})
    _add_rows(root, rows)
    return root


def _add_rows(root: Path, rows: list[dict]) -> None:
    csv = root / "metadata.csv"
    old = pd.read_csv(csv, dtype=str, keep_default_na=False) if csv.exists() else None
    pd.concat([old, pd.DataFrame(rows)], ignore_index=True).to_csv(csv, index=False)


def _manifest(out: Path) -> pd.DataFrame:
    return ImageCache(out).manifest(include_duplicates=True).set_index("path")


def _assert_cache_holds_the_files(out: Path) -> None:
    """Every manifest row's cache slot holds exactly that file, decoded and squared."""
    cache = ImageCache(out)
    for path, slot in _manifest(out)["cache_index"].items():
        np.testing.assert_array_equal(cache.array[slot], to_square(read_image(path), cache.size, cache.square),
                                      err_msg=path)


def _report(out: Path) -> dict:
    return json.loads((out / REPORT_FILE).read_text())


def _summary_counts(text: str) -> pd.DataFrame:
    """The label x source table that `summarize` prints, parsed back into numbers."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["label"])
    columns = lines[start].split()[1:]
    body = [line.split() for line in lines[start + 2:]]
    body = body[: next(i for i, tokens in enumerate(body) if not tokens)]
    return pd.DataFrame({t[0]: [int(v) for v in t[1:]] for t in body}, index=columns).T


def test_broken_files_are_listed_and_the_good_ones_ingested(tmp_path, images, capsys):
    src = _write_source(tmp_path / "src", images, list(range(6)))
    images.truncated_png(src / "img/truncated.png", images.smooth(50, 300, 300))
    (src / "img/empty.png").write_bytes(b"")
    (src / "img/text.png").write_text("not a picture\n")
    images.dicom(src / "img/nopixels.dcm", None)
    broken = {"img/empty.png": "empty file", "img/truncated.png": "truncated or corrupt",
              "img/text.png": "not an image", "img/nopixels.dcm": "no pixel data",
              "img/missing.png": "file not found"}
    _add_rows(src, [{"path": p, "label": "covid", "patient_id": f"b{i}", "source": "alpha"}
                    for i, p in enumerate(broken)])
    out = tmp_path / "data"

    code = cli.main(["ingest", str(src), "--out", str(out), "--size", str(SIZE), "--workers", "2"])

    printed = capsys.readouterr().out
    assert code == 1
    reasons = {u["path"]: u["reason"] for u in _report(out)["unreadable"]}
    assert sorted(reasons) == sorted(str(src / p) for p in broken)
    for rel, reason in broken.items():
        assert reason in reasons[str(src / rel)]
        assert f"{src / rel}: {reasons[str(src / rel)]}" in printed  # the summary lists each one with its reason
    manifest = _manifest(out)
    assert sorted(manifest.index) == sorted(str(src / f"img/alpha_{s}.png") for s in range(6))
    assert manifest["patient_id"].str.startswith("alpha:").all()
    assert _report(out)["listed"] == 11 and _report(out)["processed"] == 6
    _assert_cache_holds_the_files(out)


def test_rerun_reprocesses_only_what_changed(tmp_path, images):
    src = _write_source(tmp_path / "src", images, list(range(8)))
    out = tmp_path / "data"
    first = ingest([src], out, CFG)
    assert (first.processed, first.reused) == (8, 0)
    before = _manifest(out)
    pixels = np.array(ImageCache(out).array)

    again = ingest([src], out, CFG)
    assert (again.processed, again.reused) == (0, 8)
    pd.testing.assert_frame_equal(_manifest(out), before)

    _write_source(src, images, [20])  # one new file
    changed = src / "img/alpha_3.png"
    images.save(changed, images.smooth(99, 70, 50))  # one file replaced by another picture
    stamp = changed.stat().st_mtime_ns + 5_000_000_000
    os.utime(changed, ns=(stamp, stamp))
    third = ingest([src], out, CFG)

    assert (third.processed, third.reused) == (2, 7)
    after = _manifest(out)
    new = str(src / "img/alpha_20.png")
    assert after.at[new, "cache_index"] == before["cache_index"].max() + 1  # a new slot after the used ones
    assert after.at[str(changed), "cache_index"] == before.at[str(changed), "cache_index"]  # the same slot
    assert after.at[str(changed), "sha1"] != before.at[str(changed), "sha1"]
    untouched = [p for p in before.index if p != str(changed)]
    pd.testing.assert_frame_equal(after.loc[untouched, before.columns], before.loc[untouched])
    slots = before.loc[untouched, "cache_index"].to_numpy()
    np.testing.assert_array_equal(ImageCache(out).array[slots], pixels[slots])  # untouched pixels byte-identical
    _assert_cache_holds_the_files(out)


def test_duplicate_across_two_sources_is_kept_once(tmp_path, images):
    first = _write_source(tmp_path / "first", images, [1, 2], source="first")
    second = _write_source(tmp_path / "second", images, [3], source="second")
    original = first / "img/first_1.png"
    (second / "img/byte_copy.png").write_bytes(original.read_bytes())
    images.save(second / "img/bigger_copy.png", images.smooth(1, 180, 150))  # the same picture, upscaled
    _add_rows(second, [{"path": "img/byte_copy.png", "label": "normal", "patient_id": "x", "source": "second"},
                       {"path": "img/bigger_copy.png", "label": "normal", "patient_id": "y", "source": "second"}])
    out = tmp_path / "data"

    report = ingest([first, second], out, CFG)

    dups = pd.read_csv(out / DUPLICATES_FILE)
    assert sorted(dups["path"]) == sorted(str(second / f"img/{n}.png") for n in ("byte_copy", "bigger_copy"))
    assert (dups["duplicate_of"] == str(original)).all()  # the source listed first wins, even over a larger copy
    assert not dups["label_conflict"].any()
    assert report.duplicates == 2 and report.kept == 3
    kept = ImageCache(out).manifest()
    expected = [original, first / "img/first_2.png", second / "img/second_3.png"]
    assert sorted(kept["path"]) == sorted(map(str, expected))
    assert "duplicates dropped: 2" in summarize(out)

    reversed_out = tmp_path / "data_reversed"
    ingest([second, first], reversed_out, CFG)
    assert str(original) in pd.read_csv(reversed_out / DUPLICATES_FILE)["path"].tolist()


def _fail_after(monkeypatch, n_calls: int, name: str, target=ImageCache) -> None:
    """Make target.name raise (like Ctrl-C) from its (n_calls + 1)-th call on."""
    real = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > n_calls:
            raise KeyboardInterrupt("simulated interrupt")
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, failing)


def test_interrupted_ingest_keeps_what_was_done_and_a_rerun_completes_it(tmp_path, images, monkeypatch):
    src = _write_source(tmp_path / "src", images, list(range(12)))
    out = tmp_path / "data"
    ingest([src], out, CFG)  # a first complete run; then more files arrive and the next run is interrupted
    _write_source(src, images, list(range(12, 24)))
    pixels = np.array(ImageCache(out).array)
    _fail_after(monkeypatch, 4, "write")

    with pytest.raises(KeyboardInterrupt):
        ingest([src], out, CFG)

    monkeypatch.undo()
    partial = _manifest(out)
    assert len(partial) == 12 + 4  # the earlier images and the 4 finished before the interrupt
    assert _report(out)["processed"] == 4
    _assert_cache_holds_the_files(out)
    np.testing.assert_array_equal(ImageCache(out).array[:12], pixels[:12])

    rerun = ingest([src], out, CFG)
    assert (rerun.processed, rerun.reused) == (8, 16)
    assert len(_manifest(out)) == 24
    _assert_cache_holds_the_files(out)


def test_a_crash_before_the_final_save_keeps_the_last_checkpoint(tmp_path, images, monkeypatch):
    """Periodic saves: if the process dies mid-run (here: its 4th save fails), the manifest on disk is the 3rd save."""
    src = _write_source(tmp_path / "src", images, list(range(10)))
    out = tmp_path / "data"
    monkeypatch.setattr(ingest_mod, "SAVE_INTERVAL_S", 0.0)
    monkeypatch.setattr(ingest_mod, "SAVE_OVERHEAD", float("inf"))  # save after every image
    _fail_after(monkeypatch, 3, "_save", ingest_mod)

    with pytest.raises(KeyboardInterrupt):
        ingest([src], out, CFG)

    monkeypatch.undo()
    assert len(_manifest(out)) == 3
    _assert_cache_holds_the_files(out)
    rerun = ingest([src], out, CFG)
    assert (rerun.processed, rerun.reused) == (7, 3)
    _assert_cache_holds_the_files(out)


@pytest.mark.realdata
def test_real_sample_ingests_with_the_right_counts(shared_cxr, tmp_path, capsys):
    meta = pd.read_csv(shared_cxr / "metadata.csv", dtype=str, keep_default_na=False)
    sample = meta.sort_values("path").groupby("source").head(9)
    assert 50 <= len(sample) <= 70 and sample["source"].nunique() >= 5
    src = tmp_path / "sample"
    src.mkdir()
    cols = ["path", "label", "patient_id", "source", "view", "age_group", "sex"]
    sample.assign(path=[str(shared_cxr / p) for p in sample["path"]])[cols].to_csv(src / "metadata.csv", index=False)
    out = tmp_path / "data"

    assert cli.main(["ingest", str(src), "--out", str(out), "--size", "64", "--workers", "2"]) == 0

    report = _report(out)
    assert report["processed"] == len(sample) and not report["unreadable"]
    manifest = _manifest(out)
    by_path = sample.set_index(sample["path"].map(lambda p: str(shared_cxr / p)))
    assert sorted(manifest.index) == sorted(by_path.index)
    assert (manifest["orig_width"] == by_path.loc[manifest.index, "width"].astype(int)).all()
    assert (manifest["orig_height"] == by_path.loc[manifest.index, "height"].astype(int)).all()
    assert (manifest["label"] == by_path.loc[manifest.index, "label"]).all()
    kept = ImageCache(out).manifest()
    expected = pd.crosstab(kept["source"], kept["label"])
    printed = _summary_counts(capsys.readouterr().out)
    assert len(kept) + report["duplicates"] == len(sample)
    for source, counts in expected.iterrows():
        for label, n in counts.items():
            assert printed.at[source, label] == n
    assert printed.at["all", "all"] == len(kept)
    assert printed.at["all", "patients"] == kept["patient_id"].nunique()


def test_data_summary_prints_the_label_by_source_table(tmp_path, images, capsys):
    src = _write_source(tmp_path / "a", images, [1, 2, 4, 6, 8])  # even seeds covid: covid x4, normal x1
    other = _write_source(tmp_path / "b", images, [11, 13], source="beta")  # normal x2
    out = tmp_path / "data"
    ingest([src, other], out, CFG)
    capsys.readouterr()

    assert cli.main(["data", "summary", str(out)]) == 0

    table = _summary_counts(capsys.readouterr().out)
    assert table.loc["alpha", ["covid", "normal", "all", "patients"]].tolist() == [4, 1, 5, 5]
    assert table.loc["beta", ["covid", "normal", "all", "patients"]].tolist() == [0, 2, 2, 2]
    assert table.loc["all", ["covid", "normal", "all", "patients"]].tolist() == [4, 3, 7, 7]


@pytest.mark.parametrize("argv", [
    ["data", "summary", "{tmp}/nowhere"],
    ["ingest", "{tmp}/nowhere", "--out", "{tmp}/out"],
])
def test_bad_usage_exits_2_with_one_line(tmp_path, capsys, argv):
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a source that does not exist


def test_another_cache_size_on_existing_data_is_refused(tmp_path, images, capsys):
    src = _write_source(tmp_path / "src", images, [1, 2])
    out = tmp_path / "data"
    ingest([src], out, CFG)
    assert cli.main(["ingest", str(src), "--out", str(out), "--size", str(SIZE * 2)]) == 2
    assert "size=32, asked for 64" in capsys.readouterr().err


def _ingest_cli(*argv: str) -> subprocess.CompletedProcess:
    return run_cli("ingest", *argv, "--size", str(SIZE), "--workers", "2")


@pytest.mark.slow
def test_adding_a_second_source_keeps_the_first_without_decoding_it_again(tmp_path, images):
    first = _write_source(tmp_path / "first", images, [1, 2, 3], source="first")
    second = _write_source(tmp_path / "second", images, [4, 5], source="second")
    out = tmp_path / "data"
    assert _ingest_cli(str(first), "--out", str(out)).returncode == 0
    before = _manifest(out)
    pixels = np.array(ImageCache(out).array)

    result = _ingest_cli(str(second), "--out", str(out))

    assert result.returncode == 0, result.stderr
    report = _report(out)
    assert (report["processed"], report["reused"], report["carried_over"]) == (2, 0, 3)
    after = _manifest(out)
    assert sorted(after["source"].value_counts().items()) == [("first", 3), ("second", 2)]
    pd.testing.assert_frame_equal(after.loc[before.index], before)  # the first source's rows, slots included
    slots = before["cache_index"].to_numpy()
    np.testing.assert_array_equal(ImageCache(out).array[slots], pixels[slots])
    assert "kept 3 row(s) of source folders not given this time" in result.stdout
    _assert_cache_holds_the_files(out)


@pytest.mark.slow
def test_reingesting_a_changed_source_updates_only_its_rows(tmp_path, images):
    first = _write_source(tmp_path / "first", images, [1, 2, 3, 4], source="first")
    second = _write_source(tmp_path / "second", images, [5, 6], source="second")
    out = tmp_path / "data"
    assert _ingest_cli(str(first), str(second), "--out", str(out)).returncode == 0
    before = _manifest(out)
    _write_source(first, images, [7], source="first")  # one new file
    changed = first / "img/first_2.png"
    images.save(changed, images.smooth(99, 70, 50))
    stamp = changed.stat().st_mtime_ns + 5_000_000_000
    os.utime(changed, ns=(stamp, stamp))
    gone = first / "img/first_3.png"  # one file deleted, and its row with it
    gone.unlink()
    meta = pd.read_csv(first / "metadata.csv", dtype=str)
    meta[meta["path"] != "img/first_3.png"].to_csv(first / "metadata.csv", index=False)

    result = _ingest_cli(str(first), "--out", str(out))

    assert result.returncode == 0, result.stderr
    report = _report(out)
    assert (report["processed"], report["reused"], report["carried_over"]) == (2, 2, 2)
    assert report["removed"] == {"first": 1}
    assert "removed 1 row(s) of first: their files are gone or no longer readable" in result.stdout
    after = _manifest(out)
    assert str(gone) not in after.index and str(first / "img/first_7.png") in after.index
    assert after.at[str(changed), "sha1"] != before.at[str(changed), "sha1"]
    assert after.at[str(changed), "cache_index"] == before.at[str(changed), "cache_index"]
    untouched = [p for p in before.index if p not in (str(changed), str(gone))]
    pd.testing.assert_frame_equal(after.loc[untouched], before.loc[untouched])  # the other source's rows too
    _assert_cache_holds_the_files(out)


@pytest.mark.slow
def test_replace_keeps_only_the_given_sources_and_says_what_it_dropped(tmp_path, images):
    first = _write_source(tmp_path / "first", images, [1, 2, 3], source="first")
    second = _write_source(tmp_path / "second", images, [4, 5], source="second")
    out = tmp_path / "data"
    assert _ingest_cli(str(first), str(second), "--out", str(out)).returncode == 0
    before = _manifest(out)

    result = _ingest_cli(str(second), "--out", str(out), "--replace")

    assert result.returncode == 0, result.stderr
    assert "--replace dropped 3 row(s) of first, whose folders were not given" in result.stdout
    report = _report(out)
    assert report["dropped"] == {"first": 3}
    assert (report["processed"], report["reused"], report["carried_over"]) == (0, 2, 0)
    after = _manifest(out)
    assert set(after["source"]) == {"second"}
    pd.testing.assert_frame_equal(after, before.loc[after.index])  # kept rows keep their cache slots
    _assert_cache_holds_the_files(out)


@pytest.mark.slow
def test_csv_bad_rows_of_three_kinds_are_all_listed_by_line_and_the_rest_ingested(tmp_path, images):
    src = _write_source(tmp_path / "src", images, [1, 2, 3])  # CSV lines 2-4
    images.save(src / "img/odd.png", images.smooth(8))
    _add_rows(src, [{"path": "img/odd.png", "label": "covid-ish", "patient_id": "b1", "source": "alpha"},  # line 5
                    {"path": "img/gone.png", "label": "covid", "patient_id": "b2", "source": "alpha"},  # line 6
                    {"path": "img/alpha_4.png", "label": "normal", "patient_id": "p4", "source": "alpha"},  # line 7
                    {"path": "", "label": "normal", "patient_id": "b3", "source": "alpha"}])  # line 8
    images.save(src / "img/alpha_4.png", images.smooth(4))
    out = tmp_path / "data"

    result = _ingest_cli(str(src), "--out", str(out))

    assert result.returncode == 1, result.stderr
    csv = src / "metadata.csv"
    expected = {5: (str(src / "img/odd.png"), "label 'covid-ish' is not one of"),
                6: (str(src / "img/gone.png"), "file not found"),
                8: ("(no path)", "empty path")}
    for line, (path, reason) in expected.items():
        assert f"{csv} line {line}: {path}: {reason}" in result.stdout
    report = _report(out)
    listed = {e["line"]: (e["csv"], e["reason"]) for e in report["bad_rows"] + report["unreadable"]}
    assert sorted(listed) == [5, 6, 8] and {c for c, _ in listed.values()} == {str(csv)}
    assert sorted(_manifest(out).index) == sorted(str(src / f"img/alpha_{s}.png") for s in (1, 2, 3, 4))


def test_broken_symlink_and_unreadable_folder_are_listed_with_the_reason(tmp_path, images, monkeypatch, capsys):
    src = tmp_path / "hospital"
    images.save(src / "covid/a.png", images.smooth(1))
    images.save(src / "normal/b.png", images.smooth(2))
    (src / "covid/link.png").symlink_to(tmp_path / "nowhere.png")
    images.save(src / "normal/locked/c.png", images.smooth(3))
    locked = src / "normal/locked"
    real_scandir = os.scandir

    def scandir(path=".", *args):  # root reads any folder, so a folder without permissions is simulated
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)
    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "data"

    code = cli.main(["ingest", str(src), "--out", str(out), "--size", str(SIZE), "--workers", "1"])

    assert code == 1
    reasons = {e["path"]: e["reason"] for e in _report(out)["unreadable"]}
    assert reasons == {str(src / "covid/link.png"): f"broken symbolic link (points to {tmp_path / 'nowhere.png'}, "
                                                    "which does not exist)",
                       str(locked): "folder cannot be read (Permission denied)"}
    printed = capsys.readouterr().out
    assert all(f"{path}: {reason}" in printed for path, reason in reasons.items())
    assert sorted(_manifest(out).index) == [str(src / "covid/a.png"), str(src / "normal/b.png")]


@pytest.mark.slow
def test_broken_symlink_is_listed_through_the_cli(tmp_path, images):
    src = tmp_path / "hospital"
    images.save(src / "covid/a.png", images.smooth(1))
    images.save(src / "normal/b.png", images.smooth(2))
    (src / "normal/link.png").symlink_to("moved.png")

    result = _ingest_cli(str(src), "--out", str(tmp_path / "data"))

    assert result.returncode == 1, result.stderr
    reason = "broken symbolic link (points to moved.png, which does not exist)"
    assert f"{src / 'normal/link.png'}: {reason}" in result.stdout
    assert len(_manifest(tmp_path / "data")) == 2


def test_subgroup_fields_and_dates_come_from_the_table_or_the_dicom_header_and_survive_a_reingest(tmp_path, images):
    src = tmp_path / "src"
    images.save(src / "a.png", images.smooth(1))
    pixels = (images.smooth(2) * 4000).astype(np.uint16)
    images.dicom(src / "b.dcm", pixels, Modality="DX", Manufacturer="Acme Imaging", PatientSex="F",
                 PatientAge="045Y", ViewPosition="PA", StudyDate="20260314")
    pd.DataFrame([{"path": "a.png", "label": "covid", "modality": "cr", "manufacturer": "Fuji", "sex": "m",
                   "date": "2025-12-01"},
                  {"path": "b.dcm", "label": "normal", "modality": "", "manufacturer": "", "sex": "", "date": ""}]
                 ).to_csv(src / "metadata.csv", index=False)
    for _ in range(2):  # the second ingest reuses both files: the header's fields must stay
        ingest([src], tmp_path / "data", CFG)
        m = _manifest(tmp_path / "data")
        a, b = m.loc[str(src / "a.png")], m.loc[str(src / "b.dcm")]
        assert (a["modality"], a["manufacturer"], a["sex"], a["date"]) == ("CR", "Fuji", "M", "2025-12-01")
        assert (b["modality"], b["manufacturer"], b["sex"], b["age_group"], b["view"], b["date"]) == \
            ("DX", "Acme Imaging", "F", "adult", "PA", "2026-03-14")
