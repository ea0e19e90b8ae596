"""Per-block costs of a traced model: measured on this process's device, or analytic.

``rannc_py.profile(graph, batch_size, device=None)`` returns a :class:`Profile`.
With ``device=None`` it times every block's forward and backward here
(warm-up, repeats, median; results cached on disk by graph fingerprint,
batch size, device and blocks). With a device preset or :class:`Cluster` it
estimates times by roofline from the graph's FLOPs and bytes. Both give the
same type; blocks come from :func:`rannc_py.profiling.coarsen.coarsen`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from rannc_py.errors import ConfigError

if TYPE_CHECKING:
    from rannc_py.graph.ir import Graph
    from rannc_py.hardware.cluster import Cluster, Device


@dataclass(frozen=True)
class Profile:
    """Costs per block; time at b rows is ``fixed + per_sample * b`` seconds.

    Attributes:
        graph_fingerprint: ``Graph.fingerprint()`` of the profiled graph.
        batch_size: rows the times were measured (or estimated) at.
        device: what it was measured on / estimated for.
        source: "measured" or "analytic".
        blocks: op indices of each block, consecutive, covering the graph.
        fwd_fixed, fwd_per_sample, bwd_fixed, bwd_per_sample: per block.
        act_bytes_per_sample: per block, activation bytes kept for backward per sample.
        param_bytes: per block, bytes of the parameters and buffers it reads
            (gradients take as much again).
    """

    graph_fingerprint: str
    batch_size: int
    device: str
    source: str
    blocks: tuple[tuple[int, ...], ...]
    fwd_fixed: tuple[float, ...]
    fwd_per_sample: tuple[float, ...]
    bwd_fixed: tuple[float, ...]
    bwd_per_sample: tuple[float, ...]
    act_bytes_per_sample: tuple[float, ...]
    param_bytes: tuple[int, ...]

    def forward_time(self, block: int, rows: int) -> float:
        """Forward seconds of ``block`` at ``rows`` rows."""
        return self.fwd_fixed[block] + self.fwd_per_sample[block] * rows

    def backward_time(self, block: int, rows: int) -> float:
        """Backward seconds of ``block`` at ``rows`` rows."""
        return self.bwd_fixed[block] + self.bwd_per_sample[block] * rows

    def to_json(self) -> str:
        """Serialise; :meth:`from_json` round-trips exactly."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """Parse :meth:`to_json` output. Raises ConfigError when malformed."""
        try:
            d = json.loads(text)
            d["blocks"] = tuple(tuple(int(i) for i in b) for b in d["blocks"])
            for k in ("fwd_fixed", "fwd_per_sample", "bwd_fixed", "bwd_per_sample", "act_bytes_per_sample"):
                d[k] = tuple(float(x) for x in d[k])
            d["param_bytes"] = tuple(int(x) for x in d["param_bytes"])
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"malformed profile JSON ({e!r}); write it with Profile.to_json()") from e


def profile(
    graph: Graph,
    batch_size: int,
    device: Cluster | Device | str | None = None,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    max_blocks: int = 64,
    repeats: int = 3,
) -> Profile:
    """Profile ``graph``'s blocks at ``batch_size`` rows.

    Args:
        graph: a traced model (``rannc_py.trace``).
        batch_size: rows per forward to time at (a replica's microbatch).
        device: None to measure in this process; a Cluster, Device or preset
            string (e.g. "a64fx") for the analytic roofline estimate.
        inputs: measured only: example inputs, ``graph.flatten_inputs(args, kwargs)``;
            resized along dim 0 to ``batch_size`` when the graph has a dynamic batch.
        max_blocks: coarsening bound (see :func:`rannc_py.profiling.coarsen.coarsen`).
        repeats: measured only: timed runs per block after one warm-up (median kept).
    Returns:
        The :class:`Profile`.
    Raises:
        ConfigError: ``graph`` is not a Graph, batch_size < 1, measuring
            without (all the graph's) inputs, with repeats < 1 or with
            parameters on the meta device, unknown preset.
    """
    from rannc_py.graph.ir import Graph as GraphType
    from rannc_py.profiling.coarsen import coarsen

    if not isinstance(graph, GraphType):
        raise ConfigError(f"profile() takes a Graph from rannc_py.trace(model, args), got {type(graph).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    blocks = coarsen(graph, max_blocks)
    if device is not None:
        from rannc_py.profiling.analytic import analytic_profile

        return analytic_profile(graph, blocks, batch_size, _as_device(device))
    from rannc_py._util import atomic_write, cache_dir
    from rannc_py.profiling.measure import measure_profile

    if inputs is None:
        raise ConfigError("measuring a profile needs example inputs: pass inputs=graph.flatten_inputs(args, "
                          "kwargs), or device='<preset>' for an analytic profile")
    if missing := [name for name in graph.input_names if name not in inputs]:
        raise ConfigError(f"inputs lack the graph's inputs {missing} (it takes {graph.input_names}); pass "
                          "inputs=graph.flatten_inputs(args, kwargs)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer (timed runs per block), got {repeats!r}")
    dev = f"{platform.node()}-cpu-t{torch.get_num_threads()}"
    # "fit3": two-point fixed + per-sample fit, timed on CPU time at one thread
    # (older entries: fixed = 0, or wall-clock times that other load may have inflated).
    key = hashlib.sha256(f"fit3|{graph.fingerprint()}|{batch_size}|{dev}|{blocks}|{repeats}".encode()).hexdigest()[:24]
    path = cache_dir() / f"profile-{key}.json"
    if path.exists():
        return Profile.from_json(path.read_text())
    prof = measure_profile(graph, blocks, batch_size, dict(inputs), dev, repeats)
    atomic_write(path, prof.to_json())
    return prof


def _as_device(device: Cluster | Device | str) -> Device:
    from rannc_py.hardware.cluster import Cluster, Device, parse_cluster

    if isinstance(device, Device):
        return device
    if isinstance(device, Cluster):
        return device.device
    return parse_cluster(device).device


__all__ = ["Profile", "profile"]
