"""``swarmgate server``: load a span, join the swarm, serve until stopped."""

from __future__ import annotations

import argparse
from pathlib import Path

from blocks.gguf_checkpoint import PACKAGED
from blocks.quant import QUANT_MODES, check_quant
from blockserver import serve
from blockserver.serve import ServerConfig
from blockserver.drill import KINDS
from blockserver.limits import ServerLimits
from gateway.settings import resolve_device
from swarmgate.options import DEVICES, DTYPES, add_option, add_swarm_options, model_folder, node_options

DEFAULT = ServerConfig()
LIMITS = ServerLimits()


def add_command(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser("server", help="serve a span of a model's layers to the swarm")
    add_option(server, "--model", default=DEFAULT.model,
               help="checkpoint folder, Hugging Face hub id or packaged model (SmolLM2-135M-Instruct, gemma-3-270m) "
                    "(default: the embedded SmolLM2-135M-Instruct)")
    add_option(server, "--model-name", default=DEFAULT.model_name,
               help="name announced to the swarm (default: folder name)")
    add_option(server, "--blocks", default=None, metavar="START:END",
               help="layers to serve, end exclusive (default: the swarm's weakest, rebalanced over time)")
    add_option(server, "--num-blocks", type=int, default=DEFAULT.num_blocks, metavar="K",
               help="without --blocks: how many layers to serve (default: as many as fit in free memory)")
    add_option(server, "--rebalance-interval", type=float, default=DEFAULT.rebalance_interval,
               help="without --blocks: mean seconds between checks whether moving would balance the swarm")
    add_option(server, "--balance-quality", type=float, default=DEFAULT.balance_quality,
               help="move only if the weakest block would get 1/this times stronger (or a gap would close)")
    add_swarm_options(server)
    add_option(server, "--announce-addrs", nargs="*", default=DEFAULT.announce_addrs, metavar="MADDR",
               help="public multiaddrs to announce instead of the listen ones (behind NAT, in a container)")
    add_option(server, "--device", default="auto", choices=DEVICES,
               help="auto: cuda when a GPU is visible (one-token decode steps then replay CUDA graphs)")
    add_option(server, "--dtype", default=DEFAULT.dtype, choices=DTYPES,
               help="auto: bfloat16 on cuda, float32 on cpu")
    add_option(server, "--quant", default=DEFAULT.quant, choices=QUANT_MODES,
               help="weight quantization through bitsandbytes (cuda only): int8 halves a bf16 block, nf4 quarters it")
    add_option(server, "--max-sessions", type=int, default=LIMITS.max_sessions, help="open inference sessions")
    add_option(server, "--max-cache-tokens", type=int, default=LIMITS.max_tokens,
               help="KV-cache tokens reserved over all sessions (batch rows count separately)")
    add_option(server, "--max-batch", type=int, default=LIMITS.max_batch, help="rows of one session")
    add_option(server, "--max-batch-rows", type=int, default=LIMITS.max_batch_rows,
               help="rows of one continuous batch of different sessions' decode steps (1: no batching)")
    add_option(server, "--batch-gather-ms", type=float, default=LIMITS.batch_gather * 1000,
               help="ms a decode step may wait for the sessions that step in time with it, to batch with them "
                    "(0: never wait; a lone stream never waits)")
    add_option(server, "--batch-split", type=int, default=0,
               help="micro-batches a round of sessions decoding in step is cut into, so the chain's servers compute "
                    "at once instead of in turn; it counts the sessions the gather tracks, so --batch-gather-ms 0 turns it off "
                    "(0: auto, 2 on cpu where a step's cost grows with its rows, 1 on cuda)")
    add_option(server, "--step-groups", choices=["auto", "on", "off"], default="auto",
               help="take one-token steps of a client's sessions as one frame per hop (auto: on with cuda, where "
                    "per-session frames bound many streams; off on cpu, where whole groups lose the micro-batches' "
                    "overlap: README, \"Step groups\")")
    add_option(server, "--prefix-cache-tokens", type=int, default=LIMITS.prefix_cache_tokens,
               help="tokens of recent prompts' starts kept to skip recomputing them (0: off)")
    add_option(server, "--prefill-chunk", type=int, default=LIMITS.prefill_chunk,
               help="prompt tokens computed at a time; other sessions' decode steps run between chunks (0: whole prompts)")
    add_option(server, "--session-idle-timeout", type=float, default=LIMITS.idle_timeout,
               help="seconds before an idle session's cache is freed")
    add_option(server, "--max-frame-bytes", type=int, default=LIMITS.max_frame_bytes,
               help="largest wire frame read from a peer")
    add_option(server, "--max-forward-tokens", type=int, default=LIMITS.max_forward_tokens,
               help="batch x length of one cache-less forward")
    add_option(server, "--max-train-tokens", type=int, default=LIMITS.max_train_tokens,
               help="batch x length of one LoRA training forward or backward")
    add_option(server, "--adapter-cache-mb", type=int, default=LIMITS.adapter_cache_bytes // 2**20,
               help="MiB of LoRA adapters kept by digest (least recently used evicted)")
    add_option(server, "--train-kept-mb", type=int, default=LIMITS.train_kept_bytes // 2**20,
               help="MiB of training forwards' inputs kept for their backward, which then need not resend them")
    add_option(server, "--announce-interval", type=float, default=DEFAULT.announce_interval,
               help="seconds between record refreshes")
    add_option(server, "--throughput", type=float, default=DEFAULT.throughput, metavar="TOKENS_PER_S",
               help="announce this speed through the span instead of measuring it at start (default 0: measure; "
                    "measurements are cached per checkpoint, span length and device)")
    add_option(server, "--torch-threads", type=int, default=DEFAULT.torch_threads, help="0: torch's default")
    add_option(server, "--metrics-port", type=int, default=DEFAULT.metrics_port,
               help="serve Prometheus metrics on this port, all interfaces (default 0: off)")
    add_option(server, "--read-timeout", type=float, default=LIMITS.read_timeout,
               help="seconds a peer has to send a whole FORWARD/TRAIN request or a push stream's first step")
    add_option(server, "--max-peer-sessions", type=int, default=LIMITS.max_peer_sessions,
               help="open sessions of one peer (a gateway is one peer for all its users; default 0: --max-sessions)")
    add_option(server, "--max-peer-streams", type=int, default=LIMITS.max_peer_streams,
               help="open FORWARD, TRAIN or PUSH streams of one peer, per protocol (PUSH: at least --max-sessions)")
    add_option(server, "--peer-stream-rate", type=float, default=LIMITS.peer_stream_rate,
               help="new streams per second one peer may open, over a burst of --peer-stream-burst")
    add_option(server, "--peer-stream-burst", type=int, default=LIMITS.peer_stream_burst,
               help="new streams one peer may open at once")
    add_option(server, "--drill-corrupt", type=float, default=DEFAULT.drill_corrupt, metavar="P",
               help="DRILL ONLY: add noise to a random fraction P (0 to 1) of this server's outputs, to rehearse "
                    "and test verification (--verify-fraction on clients); logs a warning at start")
    add_option(server, "--drill-only", choices=KINDS, default=None,
               help="DRILL ONLY: corrupt only outputs of this kind (default: every kind)")
    server.set_defaults(run=main)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"--blocks must look like START:END, got {text!r}") from None
    return start, end


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The flags as a ``ServerConfig``; bad combinations, quantization and key files fail here, before the load."""
    blocks = parse_blocks(args.blocks) if args.blocks else None
    if blocks is not None and args.num_blocks:
        raise SystemExit("swarmgate server: give --blocks (fixed) or --num-blocks (chosen and rebalanced), not both")
    try:
        args.device = resolve_device(args.device)
        check_quant(args.quant, args.device)
    except ValueError as error:
        raise SystemExit(f"swarmgate server: {error}") from None
    limits = ServerLimits(
        max_sessions=args.max_sessions,
        max_tokens=args.max_cache_tokens,
        max_batch=args.max_batch,
        max_batch_rows=args.max_batch_rows,
        batch_gather=args.batch_gather_ms / 1000,
        batch_split=args.batch_split or (2 if args.device == "cpu" else 1),
        step_groups=args.step_groups == "on" or (args.step_groups == "auto" and args.device != "cpu"),
        prefix_cache_tokens=args.prefix_cache_tokens,
        prefill_chunk=args.prefill_chunk,
        idle_timeout=args.session_idle_timeout,
        max_frame_bytes=args.max_frame_bytes,
        max_forward_tokens=args.max_forward_tokens,
        max_train_tokens=args.max_train_tokens,
        adapter_cache_bytes=args.adapter_cache_mb * 2**20,
        train_kept_bytes=args.train_kept_mb * 2**20,
        read_timeout=args.read_timeout,
        max_peer_sessions=args.max_peer_sessions,
        max_peer_streams=args.max_peer_streams,
        peer_stream_rate=args.peer_stream_rate,
        peer_stream_burst=args.peer_stream_burst,
    )
    if args.batch_gather_ms < 0:
        raise SystemExit(f"swarmgate server: --batch-gather-ms must be >= 0, got {args.batch_gather_ms}")
    if args.prefill_chunk < 0:
        raise SystemExit(f"swarmgate server: --prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.throughput < 0:
        raise SystemExit(f"swarmgate server: --throughput must be >= 0, got {args.throughput}")
    if not 0.0 <= args.drill_corrupt <= 1.0:
        raise SystemExit(f"swarmgate server: --drill-corrupt must be in [0, 1], got {args.drill_corrupt}")
    if args.model in PACKAGED and not Path(args.model).expanduser().is_dir():
        args.model = str(model_folder(args.model)[1])  # converted once; the folder is named after the model
    return ServerConfig(
        model=args.model, model_name=args.model_name, blocks=blocks, num_blocks=args.num_blocks,
        rebalance_interval=args.rebalance_interval, balance_quality=args.balance_quality,
        node=node_options(args), announce_addrs=args.announce_addrs, device=args.device, dtype=args.dtype,
        quant=args.quant, limits=limits, announce_interval=args.announce_interval, throughput=args.throughput,
        torch_threads=args.torch_threads, metrics_port=args.metrics_port,
        drill_corrupt=args.drill_corrupt, drill_only=args.drill_only,
    )


def main(args: argparse.Namespace) -> None:
    serve.run(server_config(args))
