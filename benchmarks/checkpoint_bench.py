"""Checkpoint benchmark: sharded safetensors save/load against torch.save and the disk's write bandwidth.

Run from the repository root (it launches ``mpiexec`` itself):

    python benchmarks/checkpoint_bench.py [--layers 8] [--hidden 1024] [--ranks 4] [--dir DIR]

The model is the memory benchmark's GPT (``rannc_py.models.gpt``: seq 128,
vocab 256, 8 heads, tied head, ``--hidden`` wide, ``--layers`` deep; 32 x 1024
is its 403 M-parameter size, the default 8 layers runs in a few minutes on a
small machine), built on the ``meta`` device and split into ``--ranks``
pipeline stages, so each rank materialises and writes only its quarter. The
optimizer is AdamW, stepped once on zero gradients so its two moments exist.

Measured, each between barriers (the slowest rank counts):

- ``save_checkpoint`` with and without the optimizer (bytes: every rank's file);
- ``load_checkpoint`` of the full checkpoint (the files are then in the page
  cache: a load from cold storage is bounded by its read bandwidth instead);
- ``torch.save`` on rank 0 of the consolidated model state (``state_dict()``,
  gathered first; the gather is not timed), fsynced, as a single-writer
  baseline;
- the disk's write bandwidth: rank 0 writes ``--probe`` bytes in 16 MiB
  blocks and fsyncs (what ``dd conv=fsync`` measures), the limit for any
  save from one node.

Writes ``benchmarks/results/checkpoint.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
BLOCK = 16 * 2**20


def disk_bandwidth(folder: Path, nbytes: int) -> float:
    """Bytes per second of writing ``nbytes`` to a new file in ``folder`` and fsyncing it."""
    block = os.urandom(BLOCK)
    file = folder / "probe.bin"
    t0 = time.perf_counter()
    with open(file, "wb") as out:
        out.writelines(block for _ in range(max(1, nbytes // BLOCK)))
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - t0
    written = file.stat().st_size
    file.unlink()
    return written / seconds


def timed(comm: Any, fn: Any) -> float:
    """Wall time of ``fn()`` on every rank, from a barrier to the barrier after it."""
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    comm.Barrier()
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """One rank: build the stage, make Adam's state, time the saves and loads; rank 0 prints the result."""
    import torch
    from mpi4py import MPI

    import rannc_py
    from rannc_py.models.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    folder = Path(args.dir)
    cfg = GPTConfig(vocab_size=256, block_size=128, n_layer=args.layers, n_head=8, n_embd=args.hidden, dropout=0.0)
    with torch.device("meta"):
        model = GPT(cfg)
    params = model.num_parameters()
    plan = {"stages": world, "replicas": [1] * world, "microbatches": world}
    wrapped = rannc_py.RaNNCModule(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4), plan=plan,
                                   return_outputs=False)
    ids = torch.zeros(1, 128, dtype=torch.long)
    with torch.no_grad():
        wrapped(input_ids=ids, labels=ids)  # partitions: each rank materialises its stage
    opt = wrapped.optimizer
    for p in wrapped.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's moments now exist

    ckpt = folder / "ckpt"
    result: dict[str, Any] = {"params": params, "ranks": world}
    result["save_s"] = timed(comm, lambda: rannc_py.save_checkpoint(ckpt, wrapped, opt))
    mine = ckpt / f"rank{rank:05d}.safetensors"
    result["bytes_per_rank"] = comm.gather(mine.stat().st_size if mine.exists() else 0, root=0)
    result["load_s"] = timed(comm, lambda: rannc_py.load_checkpoint(ckpt, wrapped, opt))
    model_only = folder / "model_only"
    result["save_model_s"] = timed(comm, lambda: rannc_py.save_checkpoint(model_only, wrapped))
    result["model_bytes"] = sum(f.stat().st_size for f in model_only.glob("*.safetensors")) if rank == 0 else 0
    state = wrapped.state_dict()  # collective gather to rank 0
    if rank == 0:
        file = folder / "consolidated.pt"
        t0 = time.perf_counter()
        torch.save(state, file)
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        result["torch_save_s"] = time.perf_counter() - t0
        result["torch_save_bytes"] = file.stat().st_size
        del state
        result["disk_Bps"] = disk_bandwidth(folder, args.probe)
        print("RESULT " + json.dumps(result), flush=True)


def table(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The results as a Markdown table with a heading."""
    disk = r["disk_Bps"]
    total = sum(r["bytes_per_rank"])
    rows = [
        ("save_checkpoint, model + AdamW state", total, r["save_s"]),
        ("save_checkpoint, model only", r["model_bytes"], r["save_model_s"]),
        ("torch.save of the consolidated model state, rank 0", r["torch_save_bytes"], r["torch_save_s"]),
        ("load_checkpoint, model + AdamW state (page cache)", total, r["load_s"]),
    ]
    per_rank = ", ".join(f"{b / 2**20:.0f}" for b in r["bytes_per_rank"])
    heading = (
        f"# Checkpoint benchmark\n\nGPT {args.layers} layers x {args.hidden} hidden ({r['params'] / 1e6:.0f} M "
        f"parameters, fp32), {r['ranks']} ranks as {r['ranks']} pipeline stages, AdamW. Command: "
        f"`python benchmarks/checkpoint_bench.py --layers {args.layers} --hidden {args.hidden} "
        f"--ranks {args.ranks}`. Disk write bandwidth (16 MiB blocks + fsync, {args.probe / 2**30:.1f} GiB): "
        f"{disk / 1e6:.0f} MB/s. Bytes written per rank (MiB): {per_rank}.\n"
    )
    lines = [
        heading,
        "| what | bytes | time | MB/s | of disk bandwidth |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, nbytes, seconds in rows:
        rate = nbytes / seconds
        lines.append(f"| {name} | {nbytes / 2**20:,.0f} MiB | {seconds:.2f} s | {rate / 1e6:,.0f} | "
                     f"{rate / disk:.0%} |")
    note = ("\nThe bandwidth probe is one writer; the ranks write their files in parallel, which a disk serving "
            "several streams (or absorbing them in its cache before fsync returns) can take faster than one.\n")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="GPT layers (32 with --hidden 1024: 403 M)")
    parser.add_argument("--hidden", type=int, default=1024, help="GPT width (default 1024)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks = pipeline stages (default 4)")
    parser.add_argument("--probe", type=int, default=2**30, help="bytes of the disk bandwidth probe (1 GiB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="rannc-ckpt-bench-", dir=args.dir))
    cmd = [MPIEXEC, "-n", str(args.ranks), sys.executable, __file__, "--worker", "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--probe", str(args.probe), "--dir", str(folder)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800, check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit("the benchmark failed:\n" + "\n".join((out.stdout + out.stderr).splitlines()[-20:]))
    text = table(json.loads(lines[0][7:]), args)
    print(text)
    results = REPO / "benchmarks/results"
    results.mkdir(exist_ok=True)
    (results / "checkpoint.md").write_text(text)


if __name__ == "__main__":
    main()
