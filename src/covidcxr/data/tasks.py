"""Classification tasks: which labels take part and which class index each gets."""

from __future__ import annotations

import numpy as np

from covidcxr.errors import InputError

LABELS = ("covid", "normal", "pneumonia", "other")

# class order per task; the positive class (COVID-19) is always index 1 so binary scores are softmax[:, 1]
TASKS: dict[str, dict[str, int]] = {
    "covid-vs-normal": {"normal": 0, "covid": 1},  # the paper's task
    "covid-vs-rest": {"normal": 0, "pneumonia": 0, "other": 0, "covid": 1},  # pneumonia counts as negative
    "3class": {"normal": 0, "covid": 1, "pneumonia": 2},
}
POSITIVE_INDEX = 1


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def encode(labels, task: str) -> np.ndarray:
    """Class index per label; -1 for labels the task does not use (those images are left out)."""
    mapping = TASKS[check_task(task)]
    return np.array([mapping.get(str(label), -1) for label in labels], dtype=np.int64)


def class_names(task: str) -> list[str]:
    """Human names of the classes in index order (negatives merged as 'non-covid' in covid-vs-rest)."""
    if task == "covid-vs-rest":
        return ["non-covid", "covid"]
    mapping = TASKS[check_task(task)]
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
