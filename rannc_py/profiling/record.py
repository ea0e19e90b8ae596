"""The per-block cost record every profile source produces (:class:`Profile`): pure data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from rannc_py.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
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
        bwd_weight_fraction: per block, the measured share of its backward
            that computes weight gradients (what a split backward's W costs;
            the rest is I). Empty when unknown (analytic profiles, profiles
            saved before it was measured): the planner then estimates it.
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
    bwd_weight_fraction: tuple[float, ...] = ()

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
            d["bwd_weight_fraction"] = tuple(float(x) for x in d.get("bwd_weight_fraction", ()))
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"malformed profile JSON ({e!r}); write it with Profile.to_json()") from e
