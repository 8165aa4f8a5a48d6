import os
import sys

# The kernel tests compare against the core on the core tests' inputs (tests/core/core_helpers).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "core"))
