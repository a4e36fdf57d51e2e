"""Command line: python -m rotjax.report STUDY_DIR -> results.csv, report.md and figures.

The report itself is rotjax/study/report.py; this is its command line.
"""

from absl import app

from rotjax.study import report

if __name__ == '__main__':
  app.run(report.main)
