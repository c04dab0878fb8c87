"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on loopback, storage in a temp folder.

Where Orthanc cannot be had the tests skip with a message, except under CI=true, where a missing Orthanc fails (CI's
scripts/setup.sh installs it, so its absence there is a broken setup, not a reason to skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from servers import free_port

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's .so as orthanc-dicomweb installs it, or None."""
    found = [p for d in PLUGIN_DIRS if d.is_dir() for p in sorted(d.glob("libOrthancDicomWeb.so*"))]
    return found[0] if found else None


def require_orthanc() -> tuple[str, Path]:
    """The Orthanc binary and the plugin; skip (or fail under CI=true) where either is missing."""
    binary, plugin = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin"), dicomweb_plugin()
    if binary and plugin:
        return binary, plugin
    message = "Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; " \
              "scripts/setup.sh does it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


class Orthanc:
    """One Orthanc process: `start()` writes its config and waits until it answers, `stop()` ends it."""

    def __init__(self, folder: Path, aet: str = "ORTHANC", modalities: dict[str, list] | None = None):
        self.binary, self.plugin = require_orthanc()
        self.folder, self.aet = folder, aet
        self.http_port, self.dicom_port = free_port(), free_port()
        self.modalities = modalities or {}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        storage = str(self.folder / "storage")
        return {"Name": "covidcxr-test", "StorageDirectory": storage, "IndexDirectory": storage,
                "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                "DicomModalities": self.modalities, "Plugins": [str(self.plugin)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1}

    def start(self) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config()))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([self.binary, str(config)], stdout=log, stderr=log, cwd=self.folder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file through Orthanc's REST API."""
        response = requests.post(f"{self.url}/instances", data=data, timeout=10)
        response.raise_for_status()
        return response.json()

    def study_instances(self, study_uid: str) -> list[bytes]:
        """Every instance of one study, as DICOM files."""
        found = requests.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query":
                                                             {"StudyInstanceUID": study_uid}}, timeout=10).json()
        return [requests.get(f"{self.url}/instances/{i}/file", timeout=10).content for i in found]
