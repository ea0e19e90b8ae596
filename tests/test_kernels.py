"""The SIMD kernels against torch and against the scalar reference path.

Every available path (avx2 / sve / scalar) must give bitwise the scalar
reference's results on odd sizes, empty buffers and misaligned views, on one
and several threads; the sum of squares (accumulated in double, in a
different order per path) agrees to 1e-12 relative.
"""

from __future__ import annotations

import pytest
import torch

from rannc_py.errors import ConfigError
from rannc_py.optim import kernels as K

ISAS = K.available_isas()
SIZES = [0, 1, 7, 17, 33, 1001]
BIG = 100_003  # several 32K-element chunks: split over threads


@pytest.fixture(autouse=True)
def _restore_kernel_settings():
    isa, threads = K.get_isa(), K.get_num_threads()
    yield
    K.set_isa(isa)
    K.set_num_threads(threads)


def misaligned(n: int, seed: int, lo: float = -2.0, hi: float = 2.0) -> torch.Tensor:
    """n random floats in a view that starts 4 bytes into its storage."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n + 1, generator=g) * (hi - lo) + lo)[1:]


def on_each_isa(fn):
    """fn() run once per available path; returns {isa: result}."""
    out = {}
    for isa in ISAS:
        K.set_isa(isa)
        out[isa] = fn()
    return out


def assert_all_bitwise(results: dict) -> None:
    ref = results["scalar"]
    for isa, got in results.items():
        for r, x in zip(ref, got):
            assert torch.equal(r.view(torch.int32), x.view(torch.int32)), (
                f"{isa} differs from scalar"
            )


@pytest.mark.parametrize("n", SIZES)
def test_sum_scale_copy_match_torch_and_scalar(n):
    a, b, c = misaligned(n, 1), misaligned(n, 2), misaligned(n, 3)

    def run():
        d = a.clone()
        K.sum_into_(d, b)
        s = K.sum_buffers([a, b, c])
        x = K.scale_(a.clone(), 0.37)
        flat = K.pack([a, b[: n // 2]])
        u1, u2 = torch.empty(n), torch.empty(n // 2)
        K.unpack(flat, [u1, u2])
        return d, s, x, flat, u1, u2

    results = on_each_isa(run)
    assert_all_bitwise(results)
    d, s, x, flat, u1, u2 = results["scalar"]
    torch.testing.assert_close(d, a + b, rtol=0, atol=0)
    torch.testing.assert_close(s, (a + b) + c, rtol=0, atol=0)
    torch.testing.assert_close(x, a * torch.tensor(0.37), rtol=0, atol=0)
    torch.testing.assert_close(flat, torch.cat([a, b[: n // 2]]), rtol=0, atol=0)
    assert torch.equal(u1, a) and torch.equal(u2, b[: n // 2])


def test_sum_buffers_in_place_into_first_source():
    a, b = misaligned(1001, 4), misaligned(1001, 5)
    want = a + b
    out = K.sum_buffers([a, b], out=a)
    assert out is a and torch.equal(a, want)


@pytest.mark.parametrize("n", SIZES + [BIG])
def test_sum_squares(n):
    x = misaligned(n, 6, -3, 3)
    want = float((x.double() ** 2).sum())
    for isa, got in on_each_isa(lambda: K.sum_squares(x)).items():
        assert got == pytest.approx(want, rel=1e-12, abs=0.0), isa


@pytest.mark.parametrize("n", SIZES)
def test_bf16_round_trip_matches_torch(n):
    # Random bit patterns cover subnormals, infinities, NaNs and rounding ties.
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(
        -(2**31), 2**31 - 1, (n + 1,), generator=g, dtype=torch.int64
    ).to(torch.int32)
    bits[::3] &= -32768  # exact ties between two bf16 neighbours (low 15 bits clear)
    x = bits.view(torch.float32)[1:]
    h_bits = torch.randint(0, 2**16, (n,), generator=g).to(torch.int16)

    def run():
        return K.to_bf16(x).view(torch.int16), K.from_bf16(h_bits.view(torch.bfloat16))

    results = on_each_isa(run)
    for isa, (h, f) in results.items():
        assert torch.equal(h, results["scalar"][0]), isa
        assert torch.equal(
            f.view(torch.int32), results["scalar"][1].view(torch.int32)
        ), isa
    h, f = results["scalar"]
    want = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    # torch's vectorised and scalar casts pick different NaN payloads; NaN must stay NaN.
    assert torch.equal(h[~nan], want.view(torch.int16)[~nan])
    assert torch.isnan(h.view(torch.bfloat16)[nan]).all()
    want_f = h_bits.view(torch.bfloat16).float()
    assert torch.equal(torch.isnan(f), torch.isnan(want_f))
    ok = ~torch.isnan(f)
    assert torch.equal(f[ok].view(torch.int32), want_f[ok].view(torch.int32))


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_give_the_scalar_results(threads):
    K.set_num_threads(threads)
    a, b = misaligned(BIG, 8), misaligned(BIG, 9)

    def run():
        d = a.clone()
        K.sum_into_(d, b)
        flat = K.pack([a[:777], b])
        return (
            d,
            K.scale_(a.clone(), -1.5),
            flat,
            K.to_bf16(a).view(torch.int16).to(torch.int32).float(),
        )

    assert_all_bitwise(on_each_isa(run))


def test_rejects_bad_tensors():
    x = torch.zeros(4, 4)
    with pytest.raises(ConfigError, match="contiguous"):
        K.scale_(x.t(), 2.0)
    with pytest.raises(ConfigError, match="float32"):
        K.sum_squares(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="element counts"):
        K.sum_into_(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ConfigError):
        K.set_num_threads(0)
    with pytest.raises(ConfigError, match="not available"):
        K.set_isa("neon")
