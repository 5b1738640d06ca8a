"""A malformed gossipsub frame resets that stream; the server survives it and keeps serving.

py-libp2p's pubsub lets the ``DecodeError`` of an undecodable RPC escape its stream handler and,
from there, the host's nursery: 9 bytes on ``/meshsub/1.0.0`` from anyone who can dial used to stop
a server (docs/scaling.md). swarm/node.py wraps the handler (``_guarded``); this checks it end to
end, against a real ``swarmgate server`` process.
"""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest
import torch
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID
from transformers import AutoModelForCausalLM

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from tests.support import wait_until
from tests.swarm_harness import running_swarm, swarm_greedy

pytestmark = pytest.mark.e2e

GARBAGE = [
    bytes([8]) + b"\xff" * 8,  # a varint length, then 8 bytes that are no RPC (the original repro)
    bytes([4]) + b"\x0a\xff\xff\xff",  # a field whose length runs past the frame
]


async def send_garbage(address: str, frame: bytes) -> None:
    """Dial the server, open a gossipsub stream and write one malformed RPC on it."""
    host = new_host(key_pair=create_new_key_pair())
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        with trio.fail_after(15):
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [PROTOCOL_ID])
            await stream.write(frame)
        await trio.sleep(1.5)  # the server reads and handles it while the connection is open


def test_server_survives_malformed_gossip_frame(tmp_path: Path) -> None:
    model = build_checkpoint(tmp_path / "tiny", family="llama", num_layers=2)
    head = ModelHead(model)
    prompt = torch.tensor([[5, 17, 42, 9]])
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    expected = reference.generate(prompt, max_new_tokens=4, do_sample=False)[0, prompt.shape[1]:].tolist()
    with running_swarm(model, ["0:2"], log_dir=tmp_path) as (servers, bridge):
        server = servers[0]
        for frame in GARBAGE:
            try:
                trio.run(send_garbage, server.addrs[0], frame)
            except Exception:  # the server may reset the stream or the connection under us: fine
                pass
            assert server.process.poll() is None, (tmp_path / "server-0.log").read_text()[-2000:]
        log = tmp_path / "server-0.log"
        wait_until(lambda: "reset a gossip stream" in log.read_text(errors="replace"), 10,
                   message="the server did not log the reset of the bad stream")
        tokens, _ = swarm_greedy(bridge, head, model.name, prompt, 4)  # it still serves, correctly
        assert tokens[0] == expected
        assert server.process.poll() is None
