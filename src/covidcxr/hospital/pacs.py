"""Talking to a PACS: credentials, retries with backoff while it is unreachable, and storing reports by STOW-RS.

An unreachable PACS (no connection or association, a timeout, HTTP 408/429/502/503/504) is retried with exponential
backoff, one printed line per retry, then `PacsUnavailable`; a PACS that answers but will not take a report raises
`StoreRefused`; other HTTP refusals (`requests.HTTPError`) are the caller's to judge.
Credentials come from a JSON file or the environment and are never printed: lines name the PACS by its URL without
user information.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from covidcxr.errors import CovidcxrError, InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
OUTAGE_STATUS = {408, 429, 502, 503, 504}
MAX_DELAY_S = 60.0
TOKEN_ENV, USER_ENV, PASSWORD_ENV = "COVIDCXR_PACS_TOKEN", "COVIDCXR_PACS_USER", "COVIDCXR_PACS_PASSWORD"


class PacsUnavailable(CovidcxrError, ConnectionError):
    """The PACS did not answer after every retry (a ConnectionError too, so the CLI exits 2 with the line)."""


class StoreRefused(CovidcxrError):
    """The PACS answered but did not take a report; the instance is tried again (up to state.MAX_ATTEMPTS)."""


def redact(url: str) -> str:
    """The URL without user:password@, for printing."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def authorize(session: requests.Session, credentials: Path | None = None) -> None:
    """Credentials from --credentials FILE (JSON {"token": ...} or {"username": ..., "password": ...}), else from
    $COVIDCXR_PACS_TOKEN (bearer) or $COVIDCXR_PACS_USER + $COVIDCXR_PACS_PASSWORD (basic); none when neither."""
    found = _read_credentials(credentials) if credentials else {
        "token": os.environ.get(TOKEN_ENV), "username": os.environ.get(USER_ENV),
        "password": os.environ.get(PASSWORD_ENV, "")}
    if found.get("token"):
        session.headers["Authorization"] = f"Bearer {found['token']}"
    elif username := found.get("username"):
        session.auth = requests.auth.HTTPBasicAuth(username, found.get("password") or "")


def _read_credentials(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the credentials ({type(exc).__name__}): write JSON "
                         '{"token": ...} or {"username": ..., "password": ...}') from None
    if not isinstance(found, dict) or not (found.get("token") or found.get("username")):
        raise InputError(f'{path}: no "token" or "username" in the credentials file')
    return found


def connect(url: str, credentials: Path | None = None, timeout_s: float = 30) -> DICOMwebClient:
    """A client for the DICOMweb root `url`, with covidcxr's retries instead of the library's silent ones."""
    session = requests.Session()
    authorize(session, credentials)
    client = DICOMwebClient(url, session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def outage(exc: requests.RequestException | ConnectionError) -> str | None:
    """Why `exc` means the PACS is unreachable (a short phrase), or None when the PACS answered and refused."""
    if isinstance(exc, ConnectionError):  # raised by the C-STORE sender: no association
        return str(exc) or "no connection"
    if isinstance(exc, requests.ConnectionError):
        return "no connection"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    status = getattr(exc.response, "status_code", None)
    return f"HTTP {status}" if status in OUTAGE_STATUS else None


def check_retries(retries: int, backoff_s: float) -> None:
    if retries < 0 or backoff_s < 0:
        raise InputError(f"--retries {retries} --backoff {backoff_s:g}: neither may be negative")


def with_retries(call: Callable[[], T], what: str, where: str, retries: int, backoff_s: float,
                 fix: str = "that --url is its DICOMweb root") -> T:
    """`call()`, retried `retries` times with doubling delays while the PACS is unreachable; then PacsUnavailable."""
    attempt = 0
    while True:
        try:
            return call()
        except (requests.RequestException, ConnectionError) as exc:
            why = outage(exc)
            if why is None:
                raise
            if attempt == retries:
                raise PacsUnavailable(f"PACS at {where} unreachable ({why}) for {what} after {retries + 1} attempts: "
                                      f"check that it runs and {fix}") from None
            delay = min(backoff_s * 2 ** attempt, MAX_DELAY_S)
            log.warning("PACS at %s unreachable (%s) for %s; retry %d/%d in %g s", where, why, what, attempt + 1,
                        retries, delay)
            time.sleep(delay)
            attempt += 1


class Dicomweb:
    """A DICOMweb PACS (QIDO-RS, WADO-RS, STOW-RS), every request retried while it is unreachable."""

    def __init__(self, url: str, credentials: Path | None = None, retries: int = 5, backoff_s: float = 1.0):
        check_retries(retries, backoff_s)
        if urlsplit(url).scheme not in ("http", "https"):
            raise InputError(f"--url {url}: give the PACS's DICOMweb root, e.g. http://orthanc:8042/dicom-web")
        self.url, self.where, self.client = url, redact(url), connect(url, credentials)
        self.retries, self.backoff_s = retries, backoff_s

    def call(self, call: Callable[[], T], what: str) -> T:
        return with_retries(call, what, self.where, self.retries, self.backoff_s)

    def search(self, fields: list[str], filters: dict, offset: int, limit: int) -> list[dict]:
        return self.call(lambda: self.client.search_for_instances(
            fields=fields, search_filters=filters, offset=offset, limit=limit), "the search")

    def retrieve(self, study: str | None, series: str | None, uid: str) -> Dataset:
        """A missing study or series UID (a PACS's search answer without it) is dicomweb-client's ValueError."""
        return self.call(lambda: self.client.retrieve_instance(
            study, series, uid), f"retrieving {uid}")  # type: ignore[arg-type]  # typed str, raises ValueError on None

    def store(self, outputs: list[Dataset], study: str | None) -> None:
        """STOW-RS into the scored image's study; an HTTP refusal or a failed SOP in the answer is StoreRefused."""
        try:
            answer = self.call(lambda: self.client.store_instances(outputs, study), "storing the report")
        except requests.HTTPError as exc:
            raise StoreRefused(f"PACS refused the report ({http_status(exc)})") from None
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            raise StoreRefused(f"PACS refused the report (failure reason {failed[0].get('FailureReason', '?')})")


def http_status(exc: requests.HTTPError) -> str:
    """'HTTP 404 Not Found', for one-line messages."""
    response = exc.response
    return f"HTTP {response.status_code} {response.reason}" if response is not None else str(exc).splitlines()[0]
