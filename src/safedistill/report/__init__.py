"""Reports: a run's report.md with its plots (report.py) and the multi-seed comparison of presets
(compare.py)."""
