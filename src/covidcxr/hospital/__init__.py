"""covidcxr in a hospital: adapt a run to a site, read chest radiographs from a PACS, write results back as DICOM.

`calibrate` adapts a run with a site's own labelled films; `crosssite` measures the guard and calibrate under the
cross-source protocol. `watch` polls a DICOMweb PACS (QIDO-RS, WADO-RS, STOW-RS), `listen` receives pushed images
(C-STORE); both score each image once (`score`), write a Structured Report and optionally a Grad-CAM Secondary
Capture (`sr`), and remember what they did in SQLite (`state`). A research tool, not a medical device.
"""
