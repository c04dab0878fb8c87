"""Fetch the public chest X-ray databases into DIR/<name>/, in the layout the matching adapter reads.

Streams with urllib (resumable through HTTP Range on a .part file), checks sha256, unpacks zip/tar with the
single top-level folder of GitHub archives stripped, and skips databases already present. Kaggle-hosted
databases need the user's own credentials: for those the registry says how to fetch them by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from covidcxr.data.sources import LAYOUTS
from covidcxr.errors import CovidcxrError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30
DOWNLOADS = ".downloads"  # archives, .part files and .sha256 records, under DIR

_COVIDNET = (
    "research use, no licence file (COVID-Net / Figure 1 COVID-19 Chest X-ray Dataset Initiative); cite "
    "L. Wang, Z. Q. Lin, A. Wong, COVID-Net, Scientific Reports 10:19549 (2020)"
)
_NLM_TB = (
    "public NLM data set; cite S. Jaeger et al., Two public chest X-ray datasets for computer-aided "
    "screening of pulmonary diseases, Quant Imaging Med Surg 4(6):475-477 (2014)"
)
_NLM_TB_BY_HAND = (
    "the openi.nlm.nih.gov link is the one the literature gives and was not checked from here; if it fails, "
    "get the set from https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets/ and copy "
    "CXR_png/ and ClinicalReadings/ into {dest}"
)


class DownloadError(CovidcxrError, OSError):
    """A database could not be fetched; the message is one line saying why and what to do (an OSError too, as
    before it was a CovidcxrError)."""


@dataclass(frozen=True)
class Database:
    """One downloadable database and what is known about getting it."""

    name: str
    layout: str  # the sources adapter that reads DIR/<name>
    citation: str  # licence and how to cite
    urls: tuple[str, ...] = ()  # mirrors, tried in order; empty when it cannot be fetched without credentials
    archive: str = "zip"  # zip | tar | tar.gz
    sha256: str | None = None  # None: a moving archive; its digest is recorded after download
    needs_credentials: bool = False
    instructions: str = ""  # how to get it by hand; {dest} is replaced by DIR/<name>
    url_confirmed: bool = True  # False: URL taken from the literature, not checked from here


def _kaggle(arguments: str) -> str:
    """How to fetch a Kaggle-hosted database with the user's own token."""
    return (
        "install the kaggle client (pip install kaggle), put your API token in ~/.kaggle/kaggle.json, "
        f"run `kaggle {arguments} -p {{dest}}`"
    )


def _github(repo: str) -> tuple[str, ...]:
    return (f"https://github.com/{repo}/archive/refs/heads/master.zip",)


DATABASES: dict[str, Database] = {
    db.name: db
    for db in (
        Database(
            "cohen",
            "cohen",
            "per image (license column of metadata.csv: CC BY, CC BY-NC-SA, Apache 2.0, ...); cite "
            "J. P. Cohen et al., COVID-19 Image Data Collection: Prospective Predictions Are the Future, "
            "MELBA 2020",
            _github("ieee8023/covid-chestxray-dataset"),
        ),
        Database("figure1", "figure1", _COVIDNET, _github("agchung/Figure1-COVID-chestxray-dataset")),
        Database("actualmed", "actualmed", _COVIDNET, _github("agchung/Actualmed-COVID-chestxray-dataset")),
        Database(
            "montgomery",
            "montgomery_shenzhen",
            _NLM_TB,
            ("https://openi.nlm.nih.gov/imgs/collections/NLM-MontgomeryCXRSet.zip",),
            instructions=_NLM_TB_BY_HAND,
            url_confirmed=False,
        ),
        Database(
            "shenzhen",
            "montgomery_shenzhen",
            _NLM_TB,
            ("https://openi.nlm.nih.gov/imgs/collections/ChinaSet_AllFiles.zip",),
            instructions=_NLM_TB_BY_HAND,
            url_confirmed=False,
        ),
        Database(
            "radiography",
            "radiography",
            "COVID-19 Radiography Database (Qatar University, Kaggle); cite M. E. H. Chowdhury et al., IEEE "
            "Access 8:132665 (2020) and T. Rahman et al., Comput Biol Med 132:104319 (2021)",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d tawsifurrahman/covid19-radiography-database --unzip")
            + ", then ingest the folder that holds COVID/ Normal/ ...",
        ),
        Database(
            "rsna",
            "rsna",
            "RSNA Pneumonia Detection Challenge terms; cite G. Shih et al., Radiology: Artificial "
            "Intelligence 1(1):e180041 (2019)",
            needs_credentials=True,
            instructions=_kaggle("competitions download -c rsna-pneumonia-detection-challenge")
            + " after accepting the competition rules on kaggle.com, then unzip it there",
        ),
        Database(
            "kermany",
            "kermany",
            "CC BY 4.0; cite D. S. Kermany et al., Cell 172(5):1122-1131 (2018), "
            "data doi:10.17632/rscbjbr9sj.2",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d paultimothymooney/chest-xray-pneumonia --unzip"),
        ),
        Database(
            "nih",
            "nih",
            "NIH ChestX-ray14, no restrictions on use, acknowledge the NIH Clinical Center; cite "
            "X. Wang et al., ChestX-ray8, CVPR 2017",
            needs_credentials=True,
            instructions=_kaggle("datasets download -d nih-chest-xrays/data --unzip")
            + " (or fetch it by hand from https://nihcc.app.box.com/v/ChestXray-NIHCC)",
        ),
    )
}


def default_sources() -> list[str]:
    """What `covidcxr data download` fetches when no --sources are given: public, no credentials,
    confirmed URL."""
    return [db.name for db in DATABASES.values() if db.urls and not db.needs_credentials and db.url_confirmed]


def download(
    to: Path | str, sources: Iterable[str] | None = None, base_url_override: dict[str, str] | None = None
) -> list[Path]:
    """Fetch each named database (default: default_sources()) into to/<name>/ and return those folders.

    base_url_override maps a database name to a URL used instead of the registry's (a mirror, a test
    server). A database whose folder already exists is skipped. Raises DownloadError (one line) for an
    unknown name, a database that needs credentials, an unreachable host or a checksum mismatch.
    """
    to = Path(to)
    names = list(sources) if sources else default_sources()
    overrides = base_url_override or {}
    for name in names:
        _check_requestable(name, to, overrides)
    return [_download_one(DATABASES[name], to, overrides.get(name)) for name in names]


def _check_requestable(name: str, to: Path, overrides: dict[str, str]) -> None:
    """Refuse, before fetching anything, what cannot be fetched."""
    if name not in DATABASES:
        raise DownloadError(f"unknown database {name!r} (known: {', '.join(DATABASES)})")
    db = DATABASES[name]
    if name in overrides:
        return
    how = db.instructions.format(dest=to / name)
    if db.needs_credentials:
        raise DownloadError(f"{name} needs your own Kaggle credentials: {how}")
    if not db.urls:
        raise DownloadError(f"{name} has no download URL: {how}")


def _download_one(db: Database, to: Path, url_override: str | None) -> Path:
    dest = to / db.name
    if dest.exists():
        log.info("skipping %s: %s already exists", db.name, dest)
        return dest
    work = to / DOWNLOADS
    work.mkdir(parents=True, exist_ok=True)
    archive = work / f"{db.name}.{db.archive}"
    if archive.exists():
        _verify_kept(archive, db)
    else:
        _fetch_archive((url_override,) if url_override else db.urls, archive, db, to)
    _unpack(archive, dest, db)
    return dest


def _sidecar(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_archive(urls: tuple[str, ...], archive: Path, db: Database, to: Path) -> None:
    """Download to <archive>.part, check the digest, record it, then give the archive its final name."""
    part = archive.with_name(archive.name + ".part")
    error: DownloadError | None = None
    for url in urls:  # mirrors: the first that answers wins
        try:
            _fetch(url, part, db.name, to)
            break
        except DownloadError as exc:
            error = exc
    else:
        raise error or DownloadError(f"{db.name}: no URL to download from")
    digest = sha256_of(part)
    if db.sha256 and digest != db.sha256.lower():
        part.unlink()
        raise DownloadError(
            f"checksum mismatch for {db.name}: expected sha256 {db.sha256}, got {digest}; "
            "the download was removed"
        )
    _sidecar(archive).write_text(f"{digest}  {archive.name}\n")
    part.replace(archive)


def _verify_kept(archive: Path, db: Database) -> None:
    """Re-use a kept archive only if it still has the digest it was downloaded with."""
    sidecar = _sidecar(archive)
    expected = db.sha256 or (sidecar.read_text().split()[0] if sidecar.exists() else None)
    digest = sha256_of(archive)
    if expected is None:  # put there by hand: record what we found
        sidecar.write_text(f"{digest}  {archive.name}\n")
    elif digest != expected.lower():
        archive.unlink()
        sidecar.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive}: sha256 {digest} differs from the recorded {expected}; "
            "removed it, run again to re-download"
        )


def _unreachable(name: str, url: str, reason: object, to: Path) -> DownloadError:
    host = urllib.parse.urlsplit(url).netloc
    return DownloadError(
        f"cannot reach {host} for {name}: {reason}; covidcxr data download needs internet access "
        f"— copy the databases by hand into {to / name} instead"
    )


def _fetch(url: str, part: Path, name: str, to: Path) -> None:
    """Stream url into part, continuing after the bytes part already has when the server allows it."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "covidcxr", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            if _range_total(exc.headers.get("Content-Range", "")) == offset:
                return  # the .part file already holds the whole file
            part.unlink()
            return _fetch(url, part, name, to)
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason} for {name}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(name, url, getattr(exc, "reason", exc), to) from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        _stream(response, part, offset, total, name, url)
    if total is not None and part.stat().st_size != total:
        raise DownloadError(
            f"download of {name} stopped at {part.stat().st_size} of {total} bytes; run again to resume"
        )


def _range_total(content_range: str) -> int | None:
    """N from 'bytes */N' (the answer to a Range past the end)."""
    tail = content_range.rpartition("/")[2]
    return int(tail) if tail.isdigit() else None


def _stream(response, part: Path, offset: int, total: int | None, name: str, url: str) -> None:
    with open(part, "ab" if offset else "wb") as fh, tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None
    ) as bar:
        try:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"download of {name} from {urllib.parse.urlsplit(url).netloc} broke off after "
                f"{fh.tell()} bytes: {exc}; run again to resume"
            ) from None


def _unpack(archive: Path, dest: Path, db: Database) -> None:
    """Unpack next to the archive, check the adapter recognises the result, then move it to dest in one
    rename (so dest only ever exists complete, which is what makes re-runs skip it)."""
    staging = archive.with_name(archive.name + ".unpacked")
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    staging.mkdir()
    try:
        if db.archive == "zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(staging, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        archive.unlink()
        _sidecar(archive).unlink(missing_ok=True)
        raise DownloadError(
            f"{archive}: not a valid {db.archive} archive ({exc}); removed it, run again"
        ) from None
    shutil.rmtree(staging / "__MACOSX", ignore_errors=True)
    entries = list(staging.iterdir())
    content = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging  # GitHub's <repo>-master/
    if not LAYOUTS[db.layout].detect(content):
        raise DownloadError(
            f"{archive}: unpacked into {content}, which does not look like the {db.layout} layout"
        )
    content.rename(dest)
    shutil.rmtree(staging, ignore_errors=True)
