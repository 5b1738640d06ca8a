"""Drill mode (``swarmgate server --drill-corrupt P``): a server that corrupts its outputs on purpose.

Unit tests of the noise, then two real server processes of the same blocks — one honest, one
started with ``--drill-corrupt 1.0`` — asked the same inference steps, cache-less forwards and
training forwards/backwards over the wire: the honest one equals a local span bit for bit, the
drill one is off by a relative error near 1 on every output, and says so in its log.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from blocks.span import BlockSpan
from blockserver.drill import Drill, noisy
from swarm import codec, protocol
from swarm.bridge import SwarmBridge
from swarmgate.launcher import ServerProcess, start_server, stop_all
from tests.swarm_harness import FAST_ANNOUNCE, wait_for_servers


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


# -- the noise ------------------------------------------------------------------------------------

def test_an_honest_drill_returns_outputs_untouched():
    drill = Drill(0.0)
    tensor = torch.randn(2, 5, 16)
    assert drill(tensor, "decode") is tensor
    assert drill.corrupted == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noise_has_each_rows_scale(dtype):
    rows = torch.randn(3, 200, 64) * torch.logspace(-3, 3, 200).reshape(1, 200, 1)  # rows of very different scales
    rows = rows.to(dtype)
    corrupted = noisy(rows)
    assert corrupted.dtype == dtype and corrupted.shape == rows.shape
    per_row = (corrupted.float() - rows.float()).norm(dim=-1) / rows.float().norm(dim=-1)
    assert 0.6 < per_row.min() and per_row.max() < 1.6, (per_row.min(), per_row.max())


def test_zero_outputs_change_too():
    assert not torch.equal(noisy(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_one_draw_per_output_corrupts_all_its_tensors():
    grad_input, grads = torch.randn(1, 4, 8), {"a": torch.randn(2, 8), "b": torch.randn(8, 2)}
    corrupted_input, corrupted_grads = Drill(1.0)((grad_input, grads), "backward")
    assert relative_error(corrupted_input, grad_input) > 0.5
    assert all(relative_error(corrupted_grads[name], grads[name]) > 0.5 for name in grads)


def test_the_fraction_is_drawn_per_output():
    drill = Drill(0.3, rng=random.Random(1))
    tensor = torch.ones(1, 4)
    changed = sum(not torch.equal(drill(tensor, "forward"), tensor) for _ in range(2000))
    assert changed == drill.corrupted and 500 < changed < 700


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_fractions_outside_0_1_are_refused(fraction):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Drill(fraction)


def test_a_drill_of_one_kind_leaves_the_other_kinds_honest():
    drill, tensor = Drill(1.0, only="backward"), torch.randn(2, 3, 8)
    assert all(drill(tensor, kind) is tensor for kind in ("prefill", "decode", "forward"))
    assert not torch.equal(drill(tensor, "backward"), tensor) and drill.corrupted == 1
    with pytest.raises(ValueError):
        Drill(1.0, only="everything")


# -- an honest server and a drill server over the wire ---------------------------------------------

@pytest.fixture(scope="module")
def servers(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    logs = tmp_path_factory.mktemp("drill-logs")
    started: list[ServerProcess] = []
    try:
        started.append(start_server(path, "0:4", extra_args=FAST_ANNOUNCE, log_file=logs / "honest.log"))
        started.append(start_server(path, "0:4", initial_peers=started[0].addrs,
                                    extra_args=[*FAST_ANNOUNCE, "--drill-corrupt", "1.0"], log_file=logs / "drill.log"))
        bridge = SwarmBridge(initial_peers=started[0].addrs).start()
        try:
            wait_for_servers(bridge, path.name, 2)
            yield path, {"honest": started[0], "drill": started[1]}, bridge, logs
        finally:
            bridge.stop()
    finally:
        stop_all(started)


def _ask(bridge: SwarmBridge, server: ServerProcess, proto: str, frames: list[dict[str, Any]],
         reply_type: str) -> list[dict[str, Any]]:
    """Send `frames` on one stream to `server`, reading a `reply_type` reply after each."""

    async def run() -> list[dict[str, Any]]:
        stream = await bridge.client.node.open_stream(server.peer_id, proto, server.addrs)
        try:
            replies = []
            for frame in frames:
                await protocol.write_frame(stream, frame)
                replies.append(protocol.expect(await protocol.read_frame(stream, max_bytes=protocol.MAX_REPLY_FRAME),
                                               reply_type if replies or proto != protocol.INFERENCE else "opened"))
            return replies
        finally:
            await stream.close()

    return bridge.call(run)


def _decode(wire: dict[str, Any]) -> torch.Tensor:
    return codec.decode(wire, max_elements=1 << 24)


def _outputs(bridge: SwarmBridge, server: ServerProcess, hidden: torch.Tensor, grad: torch.Tensor) -> dict[str, Any]:
    """Every kind of output `server` computes, for the same inputs."""
    wire = codec.encode(hidden, "none")
    prefill, decode = hidden[:, :-1], hidden[:, -1:]
    session = _ask(bridge, server, protocol.INFERENCE, [
        {"type": "open", "session": f"drill-{server.peer_id[-8:]}", "batch": 1, "max_length": 16, "codec": "none"},
        {"type": "step", "position": 0, "hidden": codec.encode(prefill, "none")},
        {"type": "step", "position": prefill.shape[1], "hidden": codec.encode(decode, "none")},
    ], "output")
    forward = _ask(bridge, server, protocol.FORWARD, [{"type": "forward", "codec": "none", "hidden": wire}], "output")
    train = _ask(bridge, server, protocol.TRAIN, [{"type": "forward", "codec": "none", "hidden": wire}], "output")
    backward = _ask(bridge, server, protocol.TRAIN, [
        {"type": "backward", "codec": "none", "hidden": wire, "grad": codec.encode(grad, "none")}], "grads")
    return {
        "prefill": _decode(session[1]["hidden"]),
        "decode": _decode(session[2]["hidden"]),
        "forward": _decode(forward[0]["hidden"]),
        "train forward": _decode(train[0]["hidden"]),
        "backward": _decode(backward[0]["grad_input"]),
    }


def _reference(span: BlockSpan, hidden: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    cache = DynamicCache()
    prefill = span.forward(hidden[:, :-1], cache=cache, position=0)
    decode = span.forward(hidden[:, -1:], cache=cache, position=hidden.shape[1] - 1)
    whole = span.forward(hidden)
    return {"prefill": prefill, "decode": decode, "forward": whole, "train forward": whole,
            "backward": span.backward(hidden, grad, None)[0]}


@pytest.mark.e2e
def test_a_drill_server_corrupts_every_output_and_an_honest_one_none(servers):
    path, processes, bridge, logs = servers
    generator = torch.Generator().manual_seed(0)
    span = BlockSpan(path, 0, 4)
    hidden = torch.randn(1, 6, span.hidden_size, generator=generator)
    grad = torch.randn(1, 6, span.hidden_size, generator=generator)
    expected = _reference(span, hidden, grad)
    honest = _outputs(bridge, processes["honest"], hidden, grad)
    drill = _outputs(bridge, processes["drill"], hidden, grad)
    for kind, reference in expected.items():
        assert torch.equal(honest[kind], reference), (kind, relative_error(honest[kind], reference))
        assert relative_error(drill[kind], reference) > 0.5, kind
    assert "DRILL: this server corrupts 1 of its outputs" in (logs / "drill.log").read_text()
    assert "DRILL" not in (logs / "honest.log").read_text()
