import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
# tools/assets.py (real weights, tokenizers and text) serves the tests as well as the demo and benchmarks.
sys.path.insert(1, os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "tools")))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

# Property tests draw the same examples on every run (no database, derandomized), so a test suite that
# passed once passes again: CI never fails by chance. `pytest --hypothesis-profile=explore` searches anew.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")
