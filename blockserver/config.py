"""Typed configuration of a block server process; the CLI fills it from flags and env twins."""

from __future__ import annotations

from dataclasses import dataclass, field

from blockserver.placement import DEFAULT_BALANCE
from blockserver.limits import ServerLimits
from swarm.node_options import NodeOptions


@dataclass
class ServerConfig:
    model: str | None = None  # checkpoint folder or hub id; None: the embedded SmolLM2-135M-Instruct
    model_name: str | None = None  # name announced to the swarm; None: the folder name
    blocks: tuple[int, int] | None = None  # fixed span [start, end); None: placed and rebalanced
    num_blocks: int = 0  # without blocks: span length; 0: as many as fit in free memory
    rebalance_interval: float = 60.0
    balance_quality: float = DEFAULT_BALANCE
    node: NodeOptions = field(default_factory=NodeOptions)
    announce_addrs: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "auto"
    quant: str = "none"
    limits: ServerLimits = field(default_factory=ServerLimits)
    announce_interval: float = 5.0
    throughput: float = 0.0  # tokens/s through the span to announce; 0: measured (and cached) at start
    torch_threads: int = 0  # 0: torch's default
    metrics_port: int = 0  # 0: no Prometheus endpoint
    drill_corrupt: float = 0.0  # a drill: corrupt this fraction of outputs on purpose (blockserver/drill.py)
    drill_only: str | None = None  # ... of this kind of output only (blockserver.drill.KINDS)
