"""covidcxr: chest X-ray COVID-19 screening you can check."""

__version__ = "0.1.0"
