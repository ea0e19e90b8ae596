"""Fused optimizers and memory-bound kernels on flat fp32 buffers.

``FusedAdam``, ``FusedAdamW`` and ``FusedSGD`` are drop-in ``torch.optim``
optimizers (same arguments, same updates, interchangeable ``state_dict``)
whose update runs in one SIMD kernel per param group (AVX2 on x86-64, SVE on
aarch64, scalar elsewhere). ``rannc_py.optim.kernels`` exposes the kernels
themselves (sums, scaling, sum of squares, bf16 casts, bucket pack/unpack).
"""

from rannc_py.optim.adam import FusedAdam, FusedAdamW
from rannc_py.optim.kernels import get_num_threads, set_num_threads
from rannc_py.optim.sgd import FusedSGD

__all__ = ["FusedAdam", "FusedAdamW", "FusedSGD", "get_num_threads", "set_num_threads"]
