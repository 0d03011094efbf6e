"""Evaluation: data sets, judges, suites and reports (design.md, step 4)."""
