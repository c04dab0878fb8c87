"""The gate: answer only about frontal chest radiographs.

Every scoring path (predict, evaluate, serve, the PACS, calibrate, and ingest when given one) asks the gate first;
an image it refuses gets a reason a person can act on and no probability. It is a small CNN on a 48 px thumbnail of
the image's cache square, fitted by `train` on the run's own frontal films against rotated and inverted copies of
them and against examples of other kinds (covidcxr.trust.negatives), exported to ONNX and run with onnxruntime
everywhere (the service never loads torch), plus two rules that need no fitting: a blank or uniform image, and pixel
noise (neighbouring pixels as different as random ones).

The gate catches inputs far from what the run was trained on. It does not tell whether a real frontal film from a
new hospital will be scored well: that is the shift alarm's and site validation's job.

RUN/gate.onnx holds the network; RUN/gate.json its classes, its acceptance threshold and how it was fitted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidcxr.errors import InputError
from covidcxr.trust.negatives import THUMB, thumbnail

log = logging.getLogger(__name__)

GATE_FILE = "gate.json"
GATE_GRAPH = "gate.onnx"
ACCEPT = "frontal"
CLASSES = (ACCEPT, "rotated_cw", "rotated_180", "rotated_ccw", "inverted", "lateral", "other_modality",
           "photograph", "document", "blank_or_noise")
REASONS = {
    "rotated_cw": "a film rotated 90 degrees clockwise: turn it 90 degrees counter-clockwise (upright) and send it "
                  "again",
    "rotated_180": "a film upside down (rotated 180 degrees): turn it upright and send it again",
    "rotated_ccw": "a film rotated 90 degrees counter-clockwise: turn it 90 degrees clockwise (upright) and send it "
                   "again",
    "inverted": "an inverted film (a negative: bone dark, air bright): invert its gray levels and send it again",
    "lateral": "a lateral view: only frontal (PA/AP) chest radiographs are scored",
    "other_modality": "not a radiograph: a CT or MR slice or another modality",
    "photograph": "a photograph or screenshot, not a radiograph",
    "document": "a document or page of text, not a radiograph",
    "blank_or_noise": "a blank, uniform or noise image: nothing to score",
}
BLANK_STD = 0.02  # thumbnail std below this (about 5 gray levels): no content
NOISE_ROUGHNESS = 0.6  # mean |neighbour difference| / std of the thumbnail above this: pixel noise (random pixels
# ~1.13; ../shared/cxr's films at most 0.37, median 0.17)


@dataclass
class Verdict:
    """The gate's answer for one image: `kind` is a CLASSES name; `reason` is None when it is accepted."""

    kind: str
    reason: str | None
    score: float  # the network's probability that the image is not a frontal chest radiograph (NaN for a rule)

    @property
    def accepted(self) -> bool:
        return self.reason is None


def roughness(thumbs: np.ndarray) -> np.ndarray:
    """(N,) mean absolute difference of neighbouring pixels in units of each image's std: ~1.1 for pixel noise (the
    thumbnail's box average of random pixels is random too), ~0.2 for a radiograph, whose neighbours are alike."""
    x = np.asarray(thumbs, dtype=np.float32)
    diff = (np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))) / 2
    return diff / np.maximum(x.std((1, 2)), 1e-6)


def rule_kinds(thumbs: np.ndarray) -> list[str | None]:
    """'blank_or_noise' for blank/uniform or pixel-noise thumbnails, None where the rules have nothing to say."""
    blank = thumbs.std((1, 2)) < BLANK_STD
    noisy = roughness(thumbs) > NOISE_ROUGHNESS
    return ["blank_or_noise" if b or n else None for b, n in zip(blank, noisy)]


class Gate:
    """A fitted gate, loaded from RUN/gate.json + RUN/gate.onnx (or a standalone copy of the two)."""

    def __init__(self, folder: Path, info: dict, threads: int = 1):
        import onnxruntime as ort  # loaded with a gate only: data-only commands never pay for it

        self.folder, self.info = folder, info
        self.threshold = float(info["threshold"])
        self.classes = tuple(info["classes"])
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(folder / GATE_GRAPH), options, providers=["CPUExecutionProvider"])

    def __deepcopy__(self, memo: dict) -> "Gate":
        """A gate never changes once fitted: a copy of a scorer (calibrate adapts one) shares it."""
        return self

    @classmethod
    def load(cls, run_or_file: str | Path, threads: int = 1) -> "Gate | None":
        """The gate of a run folder (None when the run has none), or of a gate.json/gate.onnx path given directly."""
        path = Path(run_or_file)
        folder = path if path.is_dir() else path.parent
        if not (folder / GATE_FILE).is_file():
            if path.is_dir():
                return None
            raise InputError(f"{path}: no gate here; give a run folder or its gate.json")
        try:
            info = json.loads((folder / GATE_FILE).read_text())
            return cls(folder, info, threads)
        except (ValueError, KeyError, OSError) as e:
            raise InputError(f"{folder / GATE_FILE}: unreadable gate ({e}); refit it with covidcxr train") from None

    def probabilities(self, thumbs: np.ndarray) -> np.ndarray:
        """(N, classes) the network's probabilities for (N, G, G) thumbnails in [0, 1]."""
        if not len(thumbs):
            return np.zeros((0, len(self.classes)), np.float32)
        x = np.ascontiguousarray(thumbs[:, None], dtype=np.float32)
        return self.session.run(None, {"thumbnails": x})[0]

    def check(self, squares: np.ndarray) -> list[Verdict]:
        """One verdict per cache square (N, S, S) uint8: accepted, or refused with its reason."""
        squares = np.asarray(squares)
        thumbs = np.stack([thumbnail(s, THUMB) for s in squares]) if len(squares) else np.zeros((0, THUMB, THUMB))
        probs = self.probabilities(thumbs)
        verdicts = []
        for rule, p in zip(rule_kinds(thumbs), probs):
            if rule is not None:
                verdicts.append(Verdict(rule, REASONS[rule], float("nan")))
                continue
            accept = float(p[0]) >= self.threshold
            kind = ACCEPT if accept else self.classes[1 + int(np.argmax(p[1:]))]
            verdicts.append(Verdict(kind, None if accept else REASONS[kind], 1.0 - float(p[0])))
        return verdicts

    def reasons(self, squares: np.ndarray) -> list[str | None]:
        """Each cache square's refusal reason, or None when it is accepted (what ingest asks)."""
        return [v.reason for v in self.check(squares)]


def verdicts(gate: Gate | None, squares: np.ndarray) -> list[Verdict | None]:
    """The gate's verdict per cache square; None for each when the run has no gate (every image is scored)."""
    return list(gate.check(squares)) if gate is not None else [None] * len(squares)


_SAID_UNGATED: set[str] = set()  # trainings already said to have no gate: one line per training and process


def load_gate(run: str | Path, threads: int = 1, trained_as: str | None = None) -> Gate | None:
    """A run's gate; a run made without one is said so in one line and still scored. The line comes once per process
    for each `trained_as` (the run's settings digest: calibrate's copies of a run keep their origin's, so they share
    its line), or for each folder when that is not known."""
    gate = Gate.load(run, threads)
    if gate is None and (training := trained_as or str(Path(run).resolve())) not in _SAID_UNGATED:
        _SAID_UNGATED.add(training)
        log.warning("%s has no gate (made before gates, or trained with --no-gate): every image is scored, whatever "
                    "it shows; said once for every run trained with its settings", run)
    return gate
