import os
import sys

# tests/multirank holds the rank functions next to the tests that launch them.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "multirank"))
