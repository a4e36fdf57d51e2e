"""Puts this checkout (its rotjax) and tests/ (conftest's tiny configs) first on sys.path
of a program run as a script from anywhere: sys.path[0] is then programs/ alone."""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (TESTS, os.path.dirname(TESTS)):
  if path not in sys.path[:2]:
    sys.path.insert(0, path)
