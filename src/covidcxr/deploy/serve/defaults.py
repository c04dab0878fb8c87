"""The service's thread and batch settings, chosen for a small CPU server (measured in benchmarks/bench_serve.py).

Kept apart from the app so the CLI can state them in its help without importing the web stack or torch.
"""

from __future__ import annotations

import os

SERVE_THREADS = max(1, (os.cpu_count() or 1) - 1)  # torch intra-op threads: all cores but one, left for decoding
REQUEST_THREADS = 4  # threads reading and decoding uploads: enough to keep the model fed, few enough not to thrash
MAX_BATCH = 16  # images per forward pass
MAX_WAIT_MS = 2.0  # how long the first image of a batch waits for company
SHIFT_WINDOW = 200  # latest predictions the service compares with the validation scores (the shift alarm)
ENGINES = ("onnx", "torch")  # the first is the default: onnxruntime keeps torch (~530 MB resident) out of the server
