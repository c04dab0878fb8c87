"""Evaluation: metrics with confidence intervals, figures, the report, comparisons and the shortcut diagnostics."""
