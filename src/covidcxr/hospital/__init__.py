"""covidcxr in a hospital: read chest radiographs from a PACS and write the screening result back as DICOM.

`watch` polls a DICOMweb PACS (QIDO-RS, WADO-RS, STOW-RS), `listen` receives pushed images (C-STORE); both score each
image once (`score`), write a Structured Report and optionally a Grad-CAM Secondary Capture (`sr`), and remember what
they did in SQLite (`state`). A research tool, not a medical device.
"""
