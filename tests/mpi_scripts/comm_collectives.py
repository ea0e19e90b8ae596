"""Collectives on every group size from 1 to 8 in one launch of 8 ranks.

COMM_WORLD is split into groups of sizes (8), (7, 1), (6, 2), (5, 3), (4, 4);
each group checks every algorithm against MPI_Allreduce, reduce-scatter and
allgather (mpi, ring, torus on each grid) against their definitions, while the other group of the same split
runs concurrently. Then: many collectives in flight at once on several
communicators, and bad input failing on every rank without a hang.
"""

import torch
from _expect import each_raises_config_error  # the scripts' folder is sys.path[0]

from rannc_py.comm import allgather, allreduce, reduce_scatter, wait_all
from rannc_py.errors import ConfigError

# isort: split
from mpi4py import MPI  # after rannc_py.comm, which sets the MPI thread level

world = MPI.COMM_WORLD
wrank, wsize = world.Get_rank(), world.Get_size()
assert wsize == 8, "run with 8 ranks"

SIZES = (0, 1, 2, 3, 7, 8, 13, 1000, 4099, 65537)
SHAPES = {1: [(1,)], 2: [(2,)], 3: [(3,)], 4: [(2, 2), (1, 4)], 5: [(5,)], 6: [(2, 3), (3, 2)],
          7: [(7,)], 8: [(2, 2, 2), (4, 2)]}
count = 0


def data(n: int, rank: int, salt: int) -> torch.Tensor:
    # Positive values: sums have no cancellation, so any summation order is within rtol 1e-6.
    g = torch.Generator().manual_seed(salt * 1009 + rank)
    return torch.rand(n, generator=g) + 0.5


def mpi_reference(t: torch.Tensor, comm: MPI.Intracomm) -> torch.Tensor:
    ref = t.numpy().copy()
    comm.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
    return torch.from_numpy(ref)


def check_group(comm: MPI.Intracomm, salt: int) -> None:
    global count
    p, r = comm.Get_size(), comm.Get_rank()
    variants = [("mpi", None, 1 << 20), ("ring", None, 1 << 20), ("ring", None, 12),
                ("halving_doubling", None, 1 << 20), ("halving_doubling", None, 40)]
    variants += [("torus", s, 1 << 20) for s in SHAPES[p]] + [("torus", SHAPES[p][0], 28)]
    for n in SIZES:
        x = data(n, r, salt + n)
        ref = mpi_reference(x, comm)
        # Tiny segments (many messages per step) only where they stay few.
        seg_small = 1 << 20 if n > 1000 else None
        for algo, shape, seg in variants:
            seg = seg_small or seg
            t = x.clone()
            allreduce(t, comm, algo, shape, segment_bytes=seg).wait()
            where = f"{algo} {shape} p={p} n={n}"
            torch.testing.assert_close(t, ref, rtol=1e-6, atol=0, msg=lambda m, where=where: f"{where}: {m}")
            count += 1
        for algo, shape in [("mpi", None), ("ring", None)] + [("torus", s) for s in SHAPES[p]]:
            m = n // 3
            full = data(p * m, r, salt + 7 * n)
            out = torch.full((m,), -1.0)
            keep = full.clone()
            reduce_scatter(full, out, comm, algo, shape, segment_bytes=seg_small or 20).wait()
            expect = mpi_reference(full, comm).view(p, m)[r]
            torch.testing.assert_close(out, expect, rtol=1e-6, atol=0)
            assert torch.equal(full, keep), "reduce_scatter must leave its input intact"
            for dtype in (torch.float32, torch.int16):
                mine = (torch.arange(m) * (r + 1) + r).to(dtype)
                gathered = torch.empty(p * m, dtype=dtype)
                allgather(mine, gathered, comm, algo, shape, segment_bytes=seg_small or 6).wait()
                expect = torch.cat([(torch.arange(m) * (q + 1) + q).to(dtype) for q in range(p)])
                assert torch.equal(gathered, expect), (algo, p, m, gathered, expect)
                # In place: the input is this rank's own block of the output.
                inplace = torch.zeros(p * m, dtype=dtype)
                inplace.view(p, m)[r] = mine
                allgather(inplace.view(p, m)[r], inplace, comm, algo, shape).wait()
                assert torch.equal(inplace, expect), (algo, "in place")
                count += 3


# Every group size 1..8: each split's groups run at the same time.
for split, sizes in enumerate([(8,), (7, 1), (6, 2), (5, 3), (4, 4)]):
    color = 0 if wrank < sizes[0] else 1
    group = world.Split(color, wrank)
    check_group(group, salt=split * 100 + color)
    group.Free()

# Many collectives in flight at once on different communicators (and queued
# behind one another on the same one), with every algorithm.
comms = [world.Dup() for _ in range(4)] + [world.Split(wrank % 2, wrank), world.Split(wrank // 4, wrank)]
jobs = []
for i in range(24):
    c = comms[i % len(comms)]
    algo = ("mpi", "ring", "halving_doubling", "torus")[i % 4]
    x = data(3000 + 17 * i, c.Get_rank(), 5000 + i)
    jobs.append((x.clone(), mpi_reference(x, c), algo, c))
works = [allreduce(t, c, algo, segment_bytes=256) for t, _, algo, c in jobs]
wait_all(works)
for (t, ref, algo, c), w in zip(jobs, works):
    assert w.is_completed()
    torch.testing.assert_close(t, ref, rtol=1e-6, atol=0)
    count += 1

# Bad input. Rejected at once, identically on every rank:
each_raises_config_error([
    (lambda: allreduce(torch.zeros(8), world, "torus", (2, 3)), "6 cells but the communicator has 8"),
    (lambda: allreduce(torch.zeros(8), world, "torus", (2, 2, 3)), "12 cells"),
    (lambda: allreduce(torch.zeros(4, 4)[:, 1], world, "ring"), "not contiguous"),
    (lambda: allreduce(torch.zeros(4, dtype=torch.float64), world), "torch.float32"),
    (lambda: allreduce(torch.zeros(4), world, "tree"), "unknown algorithm"),
    (lambda: allreduce(torch.zeros(4), world, "ring", (8,)), "only used by algorithm='torus'"),
    (lambda: reduce_scatter(torch.zeros(9), torch.zeros(1), world), "expected ranks × output = 8 × 1"),
    (lambda: allgather(torch.zeros(2), torch.zeros(15), world), "expected ranks × input = 8 × 2"),
    (lambda: allreduce(torch.zeros(4), "world"), "intracommunicator"),
])

# Ranks that disagree fail on every rank at wait(), with no hang, and the
# communicator stays usable afterwards.
for algo in ("mpi", "ring", "halving_doubling", "torus"):
    n = 100 + (1 if wrank == 3 else 0)
    try:
        allreduce(torch.ones(n), world, algo).wait()
    except ConfigError as e:
        assert "disagree on the element count (smallest 100, largest 101" in str(e), e
    else:
        raise AssertionError(f"{algo}: mismatched sizes must raise ConfigError")
mixed = "ring" if wrank % 2 else "halving_doubling"
try:
    allreduce(torch.ones(10), world, mixed).wait()
except ConfigError as e:
    assert "disagree on the algorithm" in str(e), e
else:
    raise AssertionError("mismatched algorithms must raise ConfigError")
for fn in (reduce_scatter, allgather):
    m = 2 + (wrank == 0)
    try:
        fn(torch.ones(8 * m), torch.ones(m), world).wait() if fn is reduce_scatter else fn(
            torch.ones(m), torch.ones(8 * m), world).wait()
    except ConfigError as e:
        assert "disagree on the element count" in str(e), e
    else:
        raise AssertionError(f"{fn.__name__}: mismatched sizes must raise ConfigError")
t = torch.ones(5)
allreduce(t, world, "ring").wait()
assert torch.equal(t, torch.full((5,), 8.0))

print(f"rank {wrank}: ok ({count} checks)")
