"""Chunked prefill through a real server process (``--prefill-chunk``): a long prompt is computed a
chunk per turn of the server's compute slot, so another session's decode step, sent while the
prompt is being computed, is answered before the prompt is done; and the chunked prompt's output
equals the whole prompt's through the same layers in process.

The tiny Llama, one server holding every block, float32, codec none, chunks of one token (so
the prompt takes many turns and the ordering does not hang on timing).
"""

from __future__ import annotations

import pytest
import torch
import trio

from blocks.span import BlockSpan
from tests.swarm_harness import running_swarm

pytestmark = pytest.mark.e2e

PROMPT = 96


def test_a_decode_step_overtakes_a_long_prompt_and_the_prompt_stays_exact(tiny_models):
    path = tiny_models["llama"]
    span = BlockSpan(path, 0, 4)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, PROMPT, span.hidden_size, generator=generator)
    short = torch.randn(1, 4, span.hidden_size, generator=generator)
    with running_swarm(path, ["0:4"], extra_args=["--prefill-chunk", "1", "--prefix-cache-tokens", "0"]) as (
        _, bridge
    ):
        async def run() -> tuple[list[str], torch.Tensor]:
            finished: list[str] = []
            long_session = await bridge.client.open_session(path.name, 4, max_length=PROMPT + 8, wire_codec="none")
            other = await bridge.client.open_session(path.name, 4, max_length=16, wire_codec="none")
            async with long_session, other:
                await other.step(short)  # its own prompt, before the long one starts
                result: dict[str, torch.Tensor] = {}

                async def long_prompt() -> None:
                    result["output"] = await long_session.step(prompt)
                    finished.append("prompt")

                async def decode_step() -> None:
                    await trio.sleep(0.05)  # the long prompt's chunks are under way
                    await other.step(short[:, -1:])
                    finished.append("decode step")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(long_prompt)
                    nursery.start_soon(decode_step)
            return finished, result["output"]

        finished, output = bridge.call(run)
    assert finished == ["decode step", "prompt"]
    torch.testing.assert_close(output, span.forward(prompt), rtol=1e-4, atol=1e-4)
