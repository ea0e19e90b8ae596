import os
import sys
from pathlib import Path

import torch

# Tests import helpers from this folder and the example models from examples/.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

torch.set_num_threads(int(os.environ.get("RANNC_TORCH_THREADS", "1")))
