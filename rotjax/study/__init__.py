"""The study: the plan of runs over sweep axes (sweep), running it (runner), per-run
results and results.csv (results), report.md (report) and its figures (plots).

Command lines: `python -m rotjax.study --config configs/study.py --config.workdir=DIR`
trains and reports; `python -m rotjax.report DIR` rebuilds the report alone.
"""
