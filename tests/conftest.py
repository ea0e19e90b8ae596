import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

# Tests import helpers from this folder and the example models from examples/.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

torch.set_num_threads(int(os.environ.get("RANNC_TORCH_THREADS", "1")))

# Every run starts with an empty profile and calibration cache, as on a fresh
# machine: what planning measures on a cache miss is then tested every time.
# The ranks the tests launch inherit it.
_CACHE = tempfile.mkdtemp(prefix="rannc-test-cache-")
os.environ["RANNC_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
