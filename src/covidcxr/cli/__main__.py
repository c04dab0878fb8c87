"""`python -m covidcxr.cli`: the same command as the `covidcxr` script."""

import sys

from covidcxr.cli import main

sys.exit(main())
