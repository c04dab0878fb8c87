"""Settings of `covidcxr validate`: the site's own requirements a run is checked against."""

from __future__ import annotations

from dataclasses import dataclass

from covidcxr.config._rules import COUNT, FRACTION, OPEN_FRACTION, POSITIVE_INT, Rule, check_rules, optional


@dataclass
class ValidateSettings:
    """What a local validation demands; saved in validation.json so a verdict can be traced to its bar."""

    min_sensitivity: float = 0.85  # the lower end of sensitivity's 95 % CI must reach this for "validated"
    min_specificity: float = 0.70  # and specificity's this
    prevalence: float | None = None  # PPV and NPV at this prevalence; None: the site's labelled images' own
    n_boot: int = 1000  # patient-level bootstrap resamples for the CIs
    max_failures: int = 12  # wrong predictions shown (most confident first), each with its Grad-CAM
    seed: int = 0

    def __post_init__(self) -> None:
        """Check every setting when made: a bad one is one line, before any image is read."""
        check_rules(self, _VALIDATE_RULES)


_VALIDATE_RULES: dict[str, Rule] = {
    "min_sensitivity": FRACTION, "min_specificity": FRACTION, "prevalence": optional(OPEN_FRACTION),
    "n_boot": POSITIVE_INT, "max_failures": COUNT, "seed": COUNT,
}
