"""`covidcxr pacs watch`: poll a DICOMweb PACS for chest radiographs, score each once, store the reports back.

Each poll lists every instance (QIDO-RS, since --since) and handles those the state has no final word on, so a
restart neither scores twice nor misses one: a CT or anything else that is not CR/DX/DR is skipped from its search
answer without being retrieved; the rest are retrieved (WADO-RS), checked again, scored, and their reports stored into
their own study (STOW-RS).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import requests

from covidcxr.deploy.predict import Predictor
from covidcxr.deploy.serve.log import PredictionLog
from covidcxr.errors import InputError
from covidcxr.hospital.pacs import Dicomweb, PacsUnavailable, http_status
from covidcxr.hospital.score import Result, Screener, not_chest, prediction_log
from covidcxr.hospital.state import State

log = logging.getLogger(__name__)

PAGE = 1000  # instances per QIDO-RS answer
SOP_UID, STUDY_UID, SERIES_UID, MODALITY = "00080018", "0020000D", "0020000E", "00080060"


def study_date_range(since: str | None) -> dict[str, str]:
    """QIDO-RS filter for studies on or after `since` (YYYY-MM-DD or YYYYMMDD); no filter without it."""
    if since is None:
        return {}
    if not re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", since):
        raise InputError(f"--since {since}: not a date; write it as YYYY-MM-DD")
    return {"StudyDate": since.replace("-", "") + "-"}


class Watcher:
    """One PACS, one run, one state file."""

    def __init__(self, pacs: Dicomweb, predictor: Predictor, state: State, since: str | None = None,
                 cam: bool = False, predictions: PredictionLog | None = None, keep: str | None = None):
        self.pacs, self.state, self.filters = pacs, state, study_date_range(since)
        self.screener = Screener(predictor, state, pacs.store, cam, predictions, keep)

    def poll(self) -> list[Result]:
        """Handle every instance not yet handled; the results of this poll, in the PACS's order."""
        listed = self.search()
        named = [i for i in listed if _value(i, SOP_UID) is not None]
        if len(named) < len(listed):  # the state is keyed by the UID: such an answer cannot be tracked
            log.warning("%d instance(s) listed without a SOP Instance UID (the PACS breaks PS3.18): left out",
                        len(listed) - len(named))
        todo = [i for i in named if not self.state.is_final(_sop_uid(i))]
        log.debug("poll: %d instance(s) listed, %d not yet handled", len(listed), len(todo))
        return [self.handle(item) for item in todo]

    def search(self) -> list[dict]:
        """Every instance the PACS lists, page by page, read in full before any is handled (so reports stored
        meanwhile cannot shift the pages)."""
        found: list[dict] = []
        while True:
            try:
                page = self.pacs.search([MODALITY], self.filters, offset=len(found), limit=PAGE)
            except requests.HTTPError as exc:
                raise InputError(f"PACS at {self.pacs.where} refused the search ({http_status(exc)}): check --url "
                                 "(the DICOMweb root, e.g. http://host:8042/dicom-web) and the credentials") from None
            found += page
            if len(page) < PAGE:
                return found

    def handle(self, item: dict) -> Result:
        uid, study, series = _sop_uid(item), _value(item, STUDY_UID), _value(item, SERIES_UID)
        modality = _value(item, MODALITY)
        reason = not_chest(modality) if modality else None  # a PACS that leaves Modality out: checked on the file
        if reason:
            return self.screener.skip(uid, study, reason)
        try:
            ds = self.pacs.retrieve(study, series, uid)
        except requests.HTTPError as exc:
            return self.screener.retry_later(uid, study, f"PACS refused to send it ({http_status(exc)})")
        except ValueError as exc:  # dicomweb-client could not parse the answer (multipart or DICOM)
            return self.screener.retry_later(uid, study, f"PACS sent an unreadable answer ({exc})".splitlines()[0])
        return self.screener.handle(ds)


def _value(item: dict, tag: str) -> str | None:
    """One attribute of a QIDO-RS (DICOM JSON) answer."""
    return (item.get(tag, {}).get("Value") or [None])[0]


def _sop_uid(item: dict) -> str:
    """The SOP Instance UID of an answer `poll` kept (those without one are left out there)."""
    uid = _value(item, SOP_UID)
    assert uid is not None, "a QIDO-RS instance answer without a SOP Instance UID"
    return uid


def run_watch(run: str, url: str, once: bool = False, interval_s: float = 60, state_path: str = "pacs-state.sqlite",
              since: str | None = None, cam: bool = False, credentials: str | None = None, retries: int = 5,
              backoff_s: float = 1.0, keep_images: str | None = None) -> int:
    """`covidcxr pacs watch`: exit 0, or 1 when --once found instances it could not score (each listed); a PACS
    still unreachable after the retries ends --once with PacsUnavailable (exit 2) and makes a running watch wait."""
    if interval_s <= 0:
        raise InputError(f"--interval {interval_s:g}: give the seconds between polls, more than 0")
    pacs = Dicomweb(url, Path(credentials) if credentials else None, retries, backoff_s)
    predictor = Predictor.from_run(run)
    state = State(state_path)
    watcher = Watcher(pacs, predictor, state, since, cam, prediction_log(state_path, predictor), keep_images)
    log.info("watching %s with %s (state %s)", pacs.where, predictor.model_id, state_path)
    try:
        while True:
            try:
                results = watcher.poll()
            except PacsUnavailable as exc:
                if once:
                    raise
                log.warning("%s; polling again in %g s", exc, interval_s)
                results = []
            if once:
                return 1 if any(r.status in ("failed", "pending") for r in results) else 0
            time.sleep(interval_s)
    finally:
        state.close()
