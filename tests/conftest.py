import os
import sys

# Tests in every folder import the shared helpers here (hf_helpers, cli_helpers, train_helpers)
# as top-level modules; a folder's own helpers (core_helpers, ...) sit next to its tests.
sys.path.insert(0, os.path.dirname(__file__))
