"""`covidcxr pacs listen`: a DICOM C-STORE receiver (pynetdicom) for modalities that push; scores as `watch` does.

Received files go to a spool folder first (answered at once, so the modality never waits for the model) and leave
it only once their outcome is final in the state, so an image received just before a restart is still scored. Reports
go to a DICOM node by C-STORE (--store-to AET@HOST:PORT) or to a DICOMweb PACS by STOW-RS (--url).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom makes them at import (globals())
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from covidcxr.deploy.predict import Predictor
from covidcxr.errors import InputError, one_line
from covidcxr.hospital.pacs import Dicomweb, PacsUnavailable, StoreRefused, check_retries, with_retries
from covidcxr.hospital.score import Screener, prediction_log
from covidcxr.hospital.state import State

log = logging.getLogger(__name__)

C_STORE_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the warnings that still stored the object
SPOOL_POLL_S = 0.2


def parse_node(text: str) -> tuple[str, str, int]:
    """AET@HOST:PORT -> (AET, HOST, PORT)."""
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text)
    if not match:
        raise InputError(f"--store-to {text}: write the destination as AET@HOST:PORT, e.g. ORTHANC@pacs:4242")
    return match[1], match[2], int(match[3])


class CStoreSender:
    """Sends reports to one DICOM node, a new association per instance's reports, retried while it is unreachable."""

    def __init__(self, node: str, calling_aet: str, retries: int = 5, backoff_s: float = 1.0):
        check_retries(retries, backoff_s)
        self.aet, self.host, self.port = parse_node(node)
        self.where, self.retries, self.backoff_s = node, retries, backoff_s
        self.ae = AE(ae_title=calling_aet)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self.ae.add_requested_context(sop_class)

    def store(self, outputs: list[Dataset], study: str | None) -> None:
        with_retries(lambda: self._send(outputs), "storing the report", self.where, self.retries, self.backoff_s,
                     fix="that --store-to names it")

    def _send(self, outputs: list[Dataset]) -> None:
        assoc = self.ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise ConnectionError("no association")
        try:
            for ds in outputs:
                status = assoc.send_c_store(ds)
                if "Status" not in status:
                    raise ConnectionError("association lost")
                if status.Status not in C_STORE_OK:
                    raise StoreRefused(f"{self.where} refused the report (C-STORE status 0x{status.Status:04X})")
        finally:
            if assoc.is_established:
                assoc.release()


def receive(event: evt.Event, spool: Path) -> int:
    """EVT_C_STORE: write the file whole (temp name, then rename) into the spool and answer success."""
    name = f"{time.time_ns()}-{uuid.uuid4().hex}"
    part = spool / f"{name}.part"
    part.write_bytes(event.encoded_dataset())
    part.rename(spool / f"{name}.dcm")
    return 0x0000


class Listener:
    """Drains the spool through a Screener: one file at a time, oldest first."""

    def __init__(self, screener: Screener, state: State, spool: Path):
        self.screener, self.state, self.spool = screener, state, spool

    def drain(self) -> bool:
        """Handle every spooled file; False when a report could not be delivered (the rest waits for the next try)."""
        for path in sorted(self.spool.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(path)
                uid = str(ds.SOPInstanceUID)
            except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
                log.warning("cannot read received file %s: %s", path.name, one_line(exc))
                path.unlink()
                continue
            if not self.state.is_final(uid):
                try:
                    result = self.screener.handle(ds)
                except PacsUnavailable as exc:
                    log.warning("%s; keeping %s to try again", exc, uid)
                    return False
                if result.status == "pending":
                    return False
            path.unlink()
        return True


def run_listen(run: str, port: int, ae_title: str, host: str = "127.0.0.1", store_to: str | None = None,
               url: str | None = None, state_path: str = "pacs-state.sqlite", cam: bool = False,
               credentials: str | None = None, retries: int = 5, backoff_s: float = 1.0,
               keep_images: str | None = None) -> int:
    """`covidcxr pacs listen`: receive until interrupted (Ctrl-C), scoring each pushed chest radiograph once."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its failed-association lines: ours say it in one
    if (store_to is None) == (url is None):
        raise InputError("pacs listen: give where the reports go, either --store-to AET@HOST:PORT or --url "
                         "DICOMWEB_ROOT")
    sender: CStoreSender | Dicomweb
    if store_to:
        sender = CStoreSender(store_to, ae_title, retries, backoff_s)
    else:
        assert url is not None  # checked above: exactly one of store_to and url is given
        sender = Dicomweb(url, Path(credentials) if credentials else None, retries, backoff_s)
    predictor = Predictor.from_run(run)
    state = State(state_path)
    spool = Path(f"{state_path}.spool")
    spool.mkdir(parents=True, exist_ok=True)
    screener = Screener(predictor, state, sender.store, cam, prediction_log(state_path, predictor), keep_images)
    listener = Listener(screener, state, spool)
    server = start_server(ae_title, host, port, spool)
    log.info("listening on %s:%d as %s with %s; reports to %s", host, port, ae_title, predictor.model_id, sender.where)
    try:
        delay = SPOOL_POLL_S
        while True:
            delay = SPOOL_POLL_S if listener.drain() else min(max(delay * 2, backoff_s), 60.0)
            time.sleep(delay)
    finally:
        server.shutdown()
        state.close()


def start_server(ae_title: str, host: str, port: int, spool: Path):
    """The C-STORE SCP (every storage SOP class, every transfer syntax; C-ECHO too), in background threads."""
    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None  # pynetdicom's storage contexts each name their SOP class
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    try:
        return ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, receive, [spool])])
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port") from None
