"""Python entry points to the C++ SIMD kernels (``rannc_py._core.kernels``).

Tensors go to C++ zero-copy as (address, element count): each function checks
that its tensors are contiguous CPU tensors of the right dtype and raises
:class:`~rannc_py.errors.ConfigError` otherwise. Views with any storage offset
are fine (the kernels need no alignment). The kernels release the GIL.

The kernel path (``"avx2"``, ``"sve"`` or ``"scalar"``) is chosen at import
from the CPU's features; :func:`set_isa` forces another, e.g. to compare a
vector path against the scalar reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rannc_py._core import kernels as _k
from rannc_py.comm.tensors import check_tensor
from rannc_py.errors import ConfigError

ISAS = ("scalar", "avx2", "sve")


def _addr(t: Tensor, name: str, dtype: torch.dtype = torch.float32) -> int:
    """Address of ``t``'s first element after checking it can go to a kernel as is."""
    return check_tensor(t, name, dtype).data_ptr()


def _same_numel(a: Tensor, b: Tensor, what: str) -> None:
    if a.numel() != b.numel():
        raise ConfigError(
            f"{what}: element counts differ ({a.numel()} vs {b.numel()}); pass equal-sized tensors"
        )


def set_num_threads(n: int) -> None:
    """Set how many threads one kernel call may use on large buffers (default 1).

    Calls on fewer than about 32K elements per thread stay on the calling thread.

    Raises:
        ConfigError: ``n`` is not a positive integer.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"kernel thread count must be a positive int, got {n!r}")
    _k.set_num_threads(n)


def get_num_threads() -> int:
    """Return the thread count set by :func:`set_num_threads` (default 1)."""
    return int(_k.num_threads())


def get_isa() -> str:
    """Return the kernel path in use: ``"avx2"``, ``"sve"`` or ``"scalar"``."""
    return str(_k.isa())


def available_isas() -> list[str]:
    """Return the kernel paths this CPU and build can run (always includes ``"scalar"``)."""
    return [name for name in ISAS if _k.isa_available(name)]


def set_isa(name: str) -> None:
    """Force the kernels onto path ``name`` (one of :func:`available_isas`).

    Raises:
        ConfigError: ``name`` is unknown or not available here.
    """
    if name not in available_isas():
        raise ConfigError(
            f"kernel path {name!r} is not available here; choose one of {available_isas()}"
        )
    _k.set_isa(name)


def sum_into_(dst: Tensor, src: Tensor) -> Tensor:
    """Add ``src`` into ``dst`` elementwise (fp32) and return ``dst``.

    Raises:
        ConfigError: a tensor is not contiguous fp32 on CPU, or their sizes differ.
    """
    _same_numel(dst, src, "sum_into_")
    _k.sum_into(_addr(dst, "dst"), _addr(src, "src"), dst.numel())
    return dst


def sum_buffers(srcs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Return the elementwise sum of ``srcs`` (fp32), added left to right.

    ``out`` (optional, may be ``srcs[0]``) receives the result; else a new tensor.

    Raises:
        ConfigError: no sources, a tensor is not contiguous fp32 on CPU, or sizes differ.
    """
    if len(srcs) == 0:
        raise ConfigError("sum_buffers needs at least one source tensor, got none")
    if out is None:
        out = torch.empty_like(srcs[0], memory_format=torch.contiguous_format)
    for i, s in enumerate(srcs):
        _same_numel(out, s, f"sum_buffers source {i}")
    addrs = [_addr(s, f"srcs[{i}]") for i, s in enumerate(srcs)]
    _k.sum_buffers(_addr(out, "out"), addrs, out.numel())
    return out


def scale_(x: Tensor, alpha: float) -> Tensor:
    """Multiply ``x`` (fp32) by ``alpha`` in place and return it.

    Raises:
        ConfigError: ``x`` is not contiguous fp32 on CPU.
    """
    _k.scale(_addr(x, "x"), float(alpha), x.numel())
    return x


def sum_squares(x: Tensor) -> float:
    """Return the sum of ``x``'s squared elements, accumulated in double.

    Raises:
        ConfigError: ``x`` is not contiguous fp32 on CPU.
    """
    return float(_k.sum_squares(_addr(x, "x"), x.numel()))


def to_bf16(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Convert fp32 ``x`` to bfloat16 with round-to-nearest-even, like ``x.to(torch.bfloat16)``.

    NaNs become the quiet NaN 0x7FC0. ``out`` (optional) is a contiguous bf16
    tensor of the same size.

    Raises:
        ConfigError: a tensor has the wrong dtype, device, layout or size.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bfloat16)
    _same_numel(x, out, "to_bf16")
    _k.f32_to_bf16(_addr(x, "x"), _addr(out, "out", torch.bfloat16), x.numel())
    return out


def from_bf16(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Convert bfloat16 ``x`` to fp32 exactly; ``out`` (optional) is contiguous fp32.

    Raises:
        ConfigError: a tensor has the wrong dtype, device, layout or size.
    """
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    _same_numel(x, out, "from_bf16")
    _k.bf16_to_f32(_addr(x, "x", torch.bfloat16), _addr(out, "out"), x.numel())
    return out


def pack(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """Concatenate fp32 ``tensors`` (flattened) into one flat buffer and return it.

    ``out`` (optional) must hold exactly the total number of elements.

    Raises:
        ConfigError: a tensor is not contiguous fp32 on CPU, or ``out`` has the wrong size.
    """
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    if out is None:
        out = torch.empty(total, dtype=torch.float32)
    if out.numel() != total:
        raise ConfigError(
            f"pack: out holds {out.numel()} elements but the tensors hold {total}; size it to match"
        )
    addrs = [_addr(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    _k.pack(_addr(out, "out"), addrs, sizes)
    return out


def unpack(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive slices of the flat fp32 buffer ``flat`` into ``tensors``.

    Raises:
        ConfigError: a tensor is not contiguous fp32 on CPU, or the sizes do not add up.
    """
    sizes = [t.numel() for t in tensors]
    if flat.numel() != sum(sizes):
        raise ConfigError(
            f"unpack: flat holds {flat.numel()} elements but the tensors hold {sum(sizes)}; they must match"
        )
    addrs = [_addr(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    _k.unpack(_addr(flat, "flat"), addrs, sizes)
