"""Published figures beside covidcxr's: the paper's, and COVID-Net's COVID-19 sensitivity and PPV on COVIDx.

COVID-Net reports, per COVIDx release, the sensitivity and positive predictive value of its COVID-19 class on the
official test split; `evaluate --split-file` on COVIDx's test file gives covidcxr's with patient-level CIs. The figures
are not comparable as they stand: every positive of the CXR-2/3 test comes from one source and every negative from
another (reported on COVID-Net's GitHub tracker), so a model can reach them by recognising the source; the table says
so.
"""

from __future__ import annotations

from typing import Any

from covidcxr.formatting import markdown_table, number, value_ci

PAPER_NAME = "paper (Cortes & Sanchez 2021)"
PAPER = {"accuracy": 0.965, "sensitivity": 0.980, "specificity": 0.917}  # on its own 11,312 images
PAPER_DATA = "its own 11,312 images (not COVIDx); PPV not reported"
COVID_NET = [  # (model, test set, COVID-19 sensitivity, PPV), as published in lindawangg/COVID-Net
    ("COVID-Net", "COVIDx CXR-2 test: 200 positive + 200 negative", 0.955, 0.970),
    ("COVID-Net", "COVIDx CXR-3 test: 200 positive + 200 negative", 0.975, 0.990),
]
CONFOUND = ("Source confound: in the COVIDx CXR-2/3 test split every positive comes from one source and every "
            "negative from another (reported on COVID-Net's GitHub tracker), so these figures also measure how well a "
            "model tells the sources apart; they are not evidence of detecting COVID-19 at a new hospital.")


def comparison_table(ours: list[tuple[str, str, dict[str, Any] | None]]) -> str:
    """Markdown: the paper's and COVID-Net's rows, then covidcxr's (`(who, test set, metrics.json or None)`; None
    shows as not measured), then the confound."""
    rows = [[PAPER_NAME, PAPER_DATA, number(PAPER["sensitivity"], 1, 100), "-"]]
    rows += [[who, data, number(sens, 1, 100), number(ppv, 1, 100)] for who, data, sens, ppv in COVID_NET]
    for who, data, metrics in ours:
        if metrics is None:
            rows.append([who, data, "not measured", "not measured"])
            continue
        confusion = metrics["confusion"]
        shown = f"{data}: {confusion['tp'] + confusion['fn']} positive + {confusion['tn'] + confusion['fp']} negative"
        rows.append([who, shown, *(value_ci(metrics[k]["value"], metrics[k]["ci95"], 1, 100)
                                   for k in ("sensitivity", "ppv"))])
    header = ["model", "test set", "COVID-19 sensitivity % [95 % CI]", "COVID-19 PPV % [95 % CI]"]
    return markdown_table(header, rows) + "\n\n" + CONFOUND + "\n"
