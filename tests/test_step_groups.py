"""Step groups (swarm/step_groups.py, blockserver/step_groups.py): one-token steps of sessions on
the same chain go as one frame per hop, and each session gets exactly what it gets stepping
alone, whatever its batch, position, truncations or adapter; rows a server cannot take, pushes that
fail and servers that die are recovered per session. Block servers run in-process on real libp2p
nodes in one trio loop; the last test goes through `swarmgate up` and HTTP."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import trio

from blocks.tiny_checkpoints import build_checkpoint
from blockserver.limits import ServerLimits
from swarm import codec, protocol
from swarm.client import SwarmClient
from swarm.node import start_node
from swarmgate.launcher import start_up
from tests.support import free_port
from tests.swarm_harness import in_process_server

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-5  # a batched forward against one row's alone (tests/test_batching.py): rows batch differently by timing


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("groups") / "llama", family="llama", num_kv_heads=2)


@asynccontextmanager
async def _swarm(path: Path, *splits: tuple[int, int], grouped: bool = True, limits: ServerLimits = ServerLimits(),
                 **client_options):
    """Servers over `splits` and a client that knows them all, its step groups running if `grouped`."""
    async with _servers(path, list(splits), limits) as servers, start_node() as node:
        for server in servers:
            await node.connect(server.node.multiaddrs()[0])
        client = SwarmClient(node, **{"step_timeout": 10.0, **client_options})
        with trio.fail_after(20):
            while len(node.records.live("llama")) < len(servers):
                await trio.sleep(0.05)
        async with trio.open_nursery() as nursery:
            if grouped:
                await nursery.start(client.groups.run)
            yield client, servers
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _servers(path: Path, splits: list[tuple[int, int]], limits: ServerLimits = ServerLimits()):
    if not splits:
        yield []
        return
    async with in_process_server(path, *splits[0], limits) as first, _servers(path, splits[1:], limits) as rest:
        yield [first, *rest]


def _prompt(seed: int, tokens: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed))


async def _decode(client: SwarmClient, prompts: list[torch.Tensor], steps: int, *, truncate_at: int | None = None
                  ) -> list[list[torch.Tensor]]:
    """Every session's outputs: its prompt, then `steps` one-token steps taken by all sessions in the
    same moment (as a gateway's head round hands them out); `truncate_at`: the first session is cut
    back to that many positions before its third step (speculative decoding's rejected drafts)."""
    sessions = [await client.open_session("llama", 4, max_length=64, batch=p.shape[0], wire_codec="none")
                for p in prompts]
    outputs: list[list[torch.Tensor]] = [[await s.step(p)] for s, p in zip(sessions, prompts)]
    for step in range(steps):
        if truncate_at is not None and step == 2:
            await sessions[0].truncate(truncate_at)

        async def one(index: int) -> None:
            outputs[index].append(await sessions[index].step(outputs[index][-1][:, -1:] * 0.5))

        async with trio.open_nursery() as nursery:
            for index in range(len(sessions)):
                nursery.start_soon(one, index)
    for session in sessions:
        await session.close()
    return outputs


@pytest.mark.parametrize("split", [1, 2])
def test_grouped_steps_equal_each_session_stepping_alone(checkpoint, split):
    """Sessions of different prompt lengths and batches (n > 1) step as groups through two servers
    (whole, or in `split` micro-batches, as on a CPU), one truncated on the way; each output equals that of the same session stepping without groups (codec none; within
    batching's rounding), and the steps did go as groups (one frame carried several sessions)."""
    prompts = [_prompt(1, 5), _prompt(2, 9, batch=2), _prompt(3, 2), _prompt(4, 13)]
    results: dict[bool, list[list[torch.Tensor]]] = {}
    counts: dict[str, float] = {}

    async def main(grouped: bool) -> None:
        async with _swarm(checkpoint, (0, 2), (2, 4), grouped=grouped, limits=ServerLimits(batch_split=split)) \
                as (client, servers):
            results[grouped] = await _decode(client, prompts, steps=4, truncate_at=4)
            if grouped:
                counts["frames"], counts["rows"] = client.groups.frames, client.groups.rows
                counts["server"] = sum(s.metrics.group_rows._sum.get() for s in servers)

    trio.run(main, False)
    trio.run(main, True)
    for alone, grouped in zip(results[False], results[True]):
        for a, b in zip(alone, grouped):
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
    assert counts["frames"] >= 4 and counts["rows"] >= 3 * counts["frames"], counts
    assert counts["server"] == 2 * counts["rows"], counts  # both servers took every grouped row


def test_a_chain_through_a_server_without_step_groups_steps_alone(checkpoint):
    """A server that takes no STEPS stream from us (an older version, or over its per-peer limits:
    here no streams of that kind at all) costs no failure: the sessions through it send their
    steps on their own, with nothing replayed, and later ones do not try it again for a while."""
    prompts = [_prompt(10, 3), _prompt(11, 5)]
    seen: dict[str, int] = {}

    async def main() -> None:
        async with in_process_server(checkpoint, 0, 2) as first, \
                in_process_server(checkpoint, 2, 4, ServerLimits(max_peer_streams=0)) as second, \
                start_node() as node:
            for server in (first, second):
                await node.connect(server.node.multiaddrs()[0])
            client = SwarmClient(node, step_timeout=5.0)
            with trio.fail_after(20):
                while len(node.records.live("llama")) < 2:
                    await trio.sleep(0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.groups.run)
                outputs = await _decode(client, prompts, steps=3)
                seen.update(frames=client.groups.frames, replays=client.replays, steps=len(outputs[0]))
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen == {"frames": 0, "replays": 0, "steps": 4}, seen


async def _stoppable_server(path: Path, start: int, end: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A server that stops (its node closes, so do its connections) when the scope it reports is cancelled."""
    with trio.CancelScope() as scope:
        async with in_process_server(path, start, end) as server:
            task_status.started((server, scope))
            await trio.sleep_forever()


def test_a_server_dying_mid_group_is_replayed_per_session(checkpoint):
    """The second server of the chain stops while sessions decode in groups: every session replays
    onto the spare server of those blocks and its outputs equal those of an undisturbed run."""
    prompts = [_prompt(7, 4), _prompt(8, 6), _prompt(9, 3)]
    results: dict[bool, list[list[torch.Tensor]]] = {}
    replays: list[int] = []

    async def main(kill: bool) -> None:
        async with trio.open_nursery() as nursery, start_node() as node:
            servers = [await nursery.start(_stoppable_server, checkpoint, *split) for split in ((0, 2), (2, 4), (2, 4))]
            for server, _ in servers:
                await node.connect(server.node.multiaddrs()[0])
            client = SwarmClient(node, step_timeout=5.0, replace_wait=5.0)
            with trio.fail_after(20):
                while len(node.records.live("llama")) < 3:
                    await trio.sleep(0.05)
            await nursery.start(client.groups.run)
            sessions = [await client.open_session("llama", 4, max_length=64, wire_codec="none") for _ in prompts]
            outputs = [[await s.step(p)] for s, p in zip(sessions, prompts)]
            for step in range(4):
                if kill and step == 2:
                    second = sessions[0].chain[1].peer_id
                    next(scope for server, scope in servers if server.node.peer_id == second).cancel()

                async def one(index: int) -> None:
                    outputs[index].append(await sessions[index].step(outputs[index][-1][:, -1:] * 0.5))

                async with trio.open_nursery() as steps:
                    for index in range(len(sessions)):
                        steps.start_soon(one, index)
            results[kill] = outputs
            replays.append(client.replays)
            nursery.cancel_scope.cancel()

    trio.run(main, False)
    trio.run(main, True)
    for calm, killed in zip(results[False], results[True]):
        for a, b in zip(calm, killed):
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=0)
    assert replays[0] == 0 and replays[1] >= 1, replays


def test_rows_join_and_split_as_each_encodes_alone():
    """The codec's row joins and splits are byte for byte what encoding the whole or each part
    gives, for every codec where rows encode apart (int8 needs whole scale blocks per row)."""
    parts = [torch.randn(b, 1, 128, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 1)]
    for wire_codec in ("none", "float16", "bfloat16", "int8"):
        assert codec.rows_apart(wire_codec, 128)
        joined = codec.join_rows([codec.encode(p, wire_codec) for p in parts])
        assert joined == codec.encode(torch.cat(parts), wire_codec)
        assert codec.split_rows(joined, [1, 2, 1]) == [codec.encode(p, wire_codec) for p in parts]
    assert not codec.rows_apart("int8", 96) and codec.rows_apart("bfloat16", 96)
    with pytest.raises(codec.CodecError):
        codec.split_rows(codec.encode(torch.randn(3, 1, 8), "none"), [1, 1])


def test_a_malformed_group_ends_its_stream_with_an_error(checkpoint):
    """A ``steps`` frame whose rows are not [session, position, truncations, batch] is refused with
    an error frame; the server goes on serving."""
    replies: list[dict] = []

    async def main() -> None:
        async with in_process_server(checkpoint, 0, 4) as server, start_node() as node:
            await node.connect(server.node.multiaddrs()[0])
            stream = await node.open_stream(server.node.peer_id, protocol.STEPS)
            replies.append(await protocol.request(stream, {"type": "hello", "answers": True}, "ready", keep_open=True,
                                                  timeout=5))
            await protocol.write_frame(stream, {"type": "steps", "rows": [["x", -1]], "hidden": {}})
            replies.append(await protocol.read_frame(stream))
            unknown = await node.open_stream(server.node.peer_id, protocol.STEPS)
            await protocol.request(unknown, {"type": "hello", "answers": True}, "ready", keep_open=True, timeout=5)
            await protocol.write_frame(unknown, {"type": "steps", "rows": [["nobody", 0, 0, 1]],
                                                 "hidden": codec.encode(torch.zeros(1, 1, 64), "none")})
            replies.append(await protocol.read_frame(unknown))

    trio.run(main)
    assert replies[0]["type"] == "ready"
    assert replies[1]["type"] == "error" and "each row must be" in replies[1]["message"], replies[1]
    assert replies[2]["type"] == "outputs" and replies[2]["errors"][0][:2] == ["nobody", 0], replies[2]


def test_concurrent_completions_through_up_go_as_step_groups_and_equal_their_solo_runs(tiny_models, tmp_path):
    """Through `swarmgate up` (2 server processes, step groups on, as a GPU server has them; a CPU
    one does not by default), concurrent greedy completions over HTTP with the openai SDK, `n` = 2
    among them, equal their solo answers, and the gateway's /metrics show groups that carried
    several sessions' steps."""
    prompts = ["Hello", "The quick brown fox", "Once upon a time", "1, 2, 3, 4", "To be or not to be"]
    up = start_up(["--model", str(tiny_models["llama"]), "--servers", "2", "--port", str(free_port()),
                   "--wire-codec", "none", "--data-dir", str(tmp_path)], env={"SWARMGATE_STEP_GROUPS": "on"},
                  log=tmp_path / "up.log")
    try:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key=up.api_key, max_retries=0, timeout=120)

        async def one(prompt: str) -> list[str]:
            completion = await client.completions.create(model=up.model, prompt=prompt, max_tokens=16, temperature=0,
                                                         n=2 if prompt == "Hello" else 1)
            return [choice.text for choice in completion.choices]

        async def run() -> tuple[list, list]:
            alone = [await one(prompt) for prompt in prompts]
            return alone, await asyncio.gather(*(one(prompt) for prompt in prompts * 2))

        alone, together = asyncio.run(run())
        metrics = {line.split(" ")[0]: float(line.split(" ")[1])
                   for line in httpx.get(up.base_url.removesuffix("/v1") + "/metrics", timeout=10).text.splitlines()
                   if line.startswith("swarmgate_step_group")}
    finally:
        up.stop()
    assert together == alone * 2
    groups, rows = metrics["swarmgate_step_groups_total"], metrics["swarmgate_step_group_rows_total"]
    assert groups > 0 and rows > 1.5 * groups, metrics
