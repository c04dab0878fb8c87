"""Fetch the public chest X-ray databases into DIR/<name>/, in the layout the matching adapter reads.

Streams with urllib (resumable through HTTP Range on a .part file), checks sha256, unpacks zip/tar with the
single top-level folder of GitHub archives stripped, and skips databases already present. Kaggle-hosted
databases need the user's own credentials: for those the catalogue (`covidcxr.data.catalogue`) says how to fetch
them by hand.
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
from pathlib import Path

from tqdm import tqdm

from covidcxr.data.catalogue import DATABASES, Database, default_sources
from covidcxr.data.sources import LAYOUTS
from covidcxr.errors import CovidcxrError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30
DOWNLOADS = ".downloads"  # archives, .part files and .sha256 records, under DIR


class DownloadError(CovidcxrError, OSError):
    """A database could not be fetched; the message is one line saying why and what to do (an OSError too, as
    before it was a CovidcxrError)."""


def download(
    to: Path | str, sources: Iterable[str] | None = None, base_url_override: dict[str, str] | None = None
) -> list[Path]:
    """Fetch each named database (default: default_sources()) into to/<name>/ and return those folders.

    base_url_override maps a database name to a URL used instead of the catalogue's (a mirror, a test
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
    """One database into to/<name>, re-using an archive kept from an earlier run when its digest still holds."""
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
    """Where an archive's digest is recorded, so a kept archive can be checked before it is re-used."""
    return archive.with_name(archive.name + ".sha256")


def sha256_of(path: Path) -> str:
    """The file's SHA-256, read in chunks: archives are too large to hold in memory."""
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
    """The one-line error for a host that does not answer, with the way round it (copying by hand)."""
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


def _stream(response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, name: str,
            url: str) -> None:
    """Append the response to part with a progress bar; a connection that breaks leaves part for the next run."""
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
