"""Batched decode steps over a pool of KV rows (blocks/slots.py), the GPU's continuous batching.

These run the pool path eagerly on the CPU (a span told it has a static cache; graphs need CUDA,
tests/test_gpu.py replays them): one-token steps of sessions in pool rows — ragged positions,
n > 1 rows, a sliding window, a bystander session between them that does not step — give what
each session's own step on transformers' DynamicCache gives, and leave caches that keep agreeing.

Tolerance: float32, 1e-5 absolute on hidden states of unit scale — the batched step attends over
a bucket of positions with a mask, and a batched matmul may sum in another order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blocks.cache import SessionCaches, StaticKV
from blocks.graphs import CapturedStep, FusedDecode, fused_decode_supported
from blocks.slots import SlotPool, bucket
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint
from blockserver.limits import ServerLimits
from tests.support import counted_runs, random_span_lora

TOLERANCE = 1e-5
FAMILIES = {
    "llama": dict(family="llama"),
    "qwen3": dict(family="qwen3", num_kv_heads=2),
    "mistral_sliding": dict(family="mistral", num_kv_heads=2, sliding_window=16),
    "gemma3": dict(family="gemma3_text", num_kv_heads=2, sliding_window=16),
    "mixtral": dict(family="mixtral", num_kv_heads=2, intermediate_size=96),
    "phi3": dict(family="phi3", num_kv_heads=2),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slots")
    return {name: build_checkpoint(root / name, **kwargs) for name, kwargs in FAMILIES.items()}


def pooled_span(path: Path, start: int, end: int, rows: int = 8, length: int = 256, fused: bool = False) -> BlockSpan:
    span = BlockSpan(path, start, end)
    span.static_cache = True  # the GPU's cache path, eagerly on the CPU
    span.enable_slots(rows, length)
    if fused:  # the GPU's one-token layers (FusedDecode), on the CPU
        assert fused_decode_supported(span.layers, span.config.model_type)
        span.fused = FusedDecode(span.layers, span.start)
    return span


def prefilled(span: BlockSpan, shapes: list[tuple[int, int]], seed: int = 0, max_length: int = 64):
    """Sessions (rows, prompt length) with their caches prefilled: [(cache, position)]."""
    generator = torch.Generator().manual_seed(seed)
    sessions = []
    for rows, length in shapes:
        cache = span.new_cache()
        if isinstance(cache, StaticKV):
            cache.reserve(rows, max_length)
        span.forward(torch.randn(rows, length, span.hidden_size, generator=generator), cache=cache, position=0)
        sessions.append((cache, length))
    return sessions


@pytest.mark.parametrize("name, fused", [(name, False) for name in FAMILIES]
                         + [(name, True) for name in ("llama", "qwen3", "mistral_sliding")])
def test_batched_pool_steps_equal_each_sessions_own(name, fused, checkpoints):
    span, reference = pooled_span(checkpoints[name], 1, 4, fused=fused), BlockSpan(checkpoints[name], 1, 4)
    runs = counted_runs(span.fused) if fused else []
    shapes = [(1, 5), (2, 11), (1, 3), (1, 23)]  # rows, prompt length: n > 1, ragged, past the window
    pooled, alone = prefilled(span, shapes), prefilled(reference, shapes)
    assert [cache.row for cache, _ in pooled] == [0, 1, 3, 4] and all(span.batches(c) for c, _ in pooled)
    stepping = [0, 1, 3]  # the third session (row 3) stands by: the batch must not touch its cache
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        hidden = {i: torch.randn(shapes[i][0], 1, span.hidden_size, generator=generator) for i in stepping}
        together = span.forward_batch([(hidden[i], pooled[i][0], pooled[i][1] + step) for i in stepping])
        for i, out in zip(stepping, together):
            cache, position = alone[i]
            own = reference.forward(hidden[i], cache=cache, position=position + step)
            torch.testing.assert_close(out, own, atol=TOLERANCE, rtol=0)
    bystander = torch.randn(1, 1, span.hidden_size, generator=generator)
    torch.testing.assert_close(span.forward(bystander, cache=pooled[2][0], position=3),
                               reference.forward(bystander, cache=alone[2][0], position=3), atol=TOLERANCE, rtol=0)
    assert [cache.length for cache, _ in pooled] == [8, 14, 4, 26]
    assert len(runs) == (4 if fused else 0)  # the three batches and the bystander's step took the fused layers


class _Rerun:
    """A CUDA graph's stand-in on the CPU: `replay` runs the captured body again on its static
    inputs, into its output tensor, as a replay would."""

    def __init__(self, body, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.body, self.inputs, self.output = body, inputs, output

    def replay(self) -> None:
        self.output.copy_(self.body(*self.inputs))


def graphs_on_the_cpu(span: BlockSpan) -> list[tuple[torch.Tensor, ...]]:
    """Turn the span's graph paths on with `_Rerun` captures; returns copies of the captures' inputs
    as they were captured (a replay fills the inputs themselves with its own values)."""
    captured = []

    def capture(device, inputs, body, adapter, memory=None):
        captured.append(tuple(tensor.clone() for tensor in inputs))
        output = body(*inputs)
        return output.clone(), CapturedStep(_Rerun(body, inputs, output), inputs, output, adapter)

    span.use_graphs = True
    span._gpu.capture = capture
    return captured


@pytest.mark.parametrize("name", ["llama", "mistral_sliding", "gemma3"])
def test_short_steps_replay_one_graph_per_bucket_in_any_rows(name, checkpoints):
    """Steps of a few tokens of sessions in pool rows (short prompts, a cached prompt's tail,
    drafts) run eagerly the first time a (rows, width, length, adapter) bucket comes, then through
    one captured step per bucket, whichever rows a session sits in, and give what each session's
    own steps give; the tokens padding a step to its width write nowhere a session attends (the
    one-token steps after them agree too)."""
    span, reference = pooled_span(checkpoints[name], 1, 4), BlockSpan(checkpoints[name], 1, 4)
    captured = graphs_on_the_cpu(span)
    shapes = [(1, 5), (2, 11), (1, 23)]  # widths 16, 16 (2 rows), 32: three buckets, each new: eager
    pooled, alone = prefilled(span, shapes), prefilled(reference, shapes)
    assert [cache.row for cache, _ in pooled] == [0, 1, 3] and not captured
    generator = torch.Generator().manual_seed(4)
    adapter = random_span_lora(span, generator)
    # width 16, one row: captured at row 3, replayed at row 0; the adapter's: eager, captured, replayed
    for index, tokens, lora in ((2, 7, None), (0, 3, None), (0, 9, adapter), (2, 4, adapter), (0, 2, adapter)):
        cache, position = pooled[index]
        hidden = torch.randn(1, tokens, span.hidden_size, generator=generator)
        own = reference.forward(hidden, cache=alone[index][0], position=position, adapter=lora)
        torch.testing.assert_close(span.forward(hidden, cache=cache, position=position, adapter=lora), own,
                                   atol=TOLERANCE, rtol=0)
        pooled[index], alone[index] = (cache, position + tokens), (alone[index][0], position + tokens)
    assert [(inputs[0].shape[:2], int(inputs[3][0])) for inputs in captured] == [((1, 16), 3), ((1, 16), 3)]
    assert len(span.slot_pool.short_graphs) == 2
    hidden = [torch.randn(rows, 1, span.hidden_size, generator=generator) for rows, _ in shapes]
    together = span.forward_batch([(h, cache, position) for h, (cache, position) in zip(hidden, pooled)])
    for h, out, (cache, position) in zip(hidden, together, alone):
        torch.testing.assert_close(out, reference.forward(h, cache=cache, position=position), atol=TOLERANCE, rtol=0)


def test_sessions_longer_than_a_row_take_short_steps_through_the_staging_row(checkpoints):
    """A one-row session with buffers of its own (longer than a pool row) takes its short steps
    through the span's staging row: its positions copied in, the new ones copied back, so the
    same captured steps serve every such session and its own cache stays right."""
    span, reference = BlockSpan(checkpoints["llama"], 0, 4), BlockSpan(checkpoints["llama"], 0, 4)
    span.static_cache = True
    span.enable_slots(rows=2, length=16, staged=256)
    captured = graphs_on_the_cpu(span)
    generator = torch.Generator().manual_seed(6)
    sessions = []
    for prompt in (40, 30):  # longer than a row: buffers of their own
        cache, own = span.new_cache(), reference.new_cache()
        cache.reserve(1, 100)
        hidden = torch.randn(1, prompt, span.hidden_size, generator=generator)
        torch.testing.assert_close(span.forward(hidden, cache=cache, position=0),
                                   reference.forward(hidden, cache=own, position=0), atol=TOLERANCE, rtol=0)
        sessions.append([cache, own, prompt])
    assert [cache.pooled for cache, _, _ in sessions] == [False, False] and not captured  # widths 64, 32: eager
    for tokens in (9, 1, 5, 20):  # width 16: eager, captured, replayed twice; width 32 captured, replayed
        for session in sessions:
            cache, own, position = session
            hidden = torch.randn(1, tokens, span.hidden_size, generator=generator)
            torch.testing.assert_close(span.forward(hidden, cache=cache, position=position),
                                       reference.forward(hidden, cache=own, position=position), atol=TOLERANCE, rtol=0)
            session[2] += tokens
    assert len(span.staging.short_graphs) == 2 and not span.slot_pool.keys  # the pool's rows never used


def step_together_and_alone(span: BlockSpan, reference: BlockSpan, pooled: list, alone: list, stepping: list[int],
                            generator: torch.Generator) -> None:
    """One-token steps of sessions `stepping` as one batch on `span`, each equal to its own step on
    `reference`; both sessions' (cache, position) entries move on a token."""
    hidden = {i: torch.randn(pooled[i][0].batch, 1, span.hidden_size, generator=generator) for i in stepping}
    together = span.forward_batch([(hidden[i], *pooled[i]) for i in stepping])
    for i, out in zip(stepping, together):
        torch.testing.assert_close(out, reference.forward(hidden[i], cache=alone[i][0], position=alone[i][1]),
                                   atol=TOLERANCE, rtol=0)
        pooled[i], alone[i] = (pooled[i][0], pooled[i][1] + 1), (alone[i][0], alone[i][1] + 1)


def test_decode_steps_captured_at_start_serve_every_batch_after(checkpoints):
    """A server captures its pool's one-token step of every (rows, length) bucket as it starts
    (`capture_decode_steps`), writing nothing a session could see; steps after it replay those
    graphs — lone or batched, in any rows — with no capture while serving, and give what each
    session's own steps give."""
    span, reference = pooled_span(checkpoints["llama"], 1, 4, rows=6, length=512), BlockSpan(checkpoints["llama"], 1, 4)
    shapes = [(1, 5), (2, 11), (1, 23)]
    pooled, alone = prefilled(span, shapes), prefilled(reference, shapes)  # sessions held while it captures
    captured = graphs_on_the_cpu(span)
    assert span.slot_pool.decode_buckets() == [(rows, length) for rows in (1, 2, 4, 6) for length in (256, 512)]
    assert span.capture_decode_steps() == 8 and len(captured) == 8 and len(span.slot_pool.graphs) == 8
    assert all(int(positions.min()) == span.slot_pool.scratch for _, positions in captured)
    generator = torch.Generator().manual_seed(7)
    for stepping in ([0], [0, 1, 2], [2], [1, 2]):  # rows 1, 4 (rows 0-3), 4 (row 3), 4
        step_together_and_alone(span, reference, pooled, alone, stepping, generator)
    assert len(captured) == 8


def test_each_pool_of_rows_captures_its_buckets_and_batches_its_own_sessions(checkpoints):
    """With a second pool of longer rows, a prompt longer than the first pool's rows starts in the
    second; each pool's buckets are captured at start, and steps of sessions in either replay
    them, batched per pool, with no capture while serving."""
    span, reference = BlockSpan(checkpoints["llama"], 1, 4), BlockSpan(checkpoints["llama"], 1, 4)
    span.static_cache = True
    span.enable_slots(rows=4, length=256, longer=(2, 512))
    shapes = [(1, 300), (1, 5), (1, 400)]
    pooled, alone = prefilled(span, shapes, max_length=1000), prefilled(reference, shapes, max_length=1000)
    short, long = span.slot_pools
    assert [(cache.pool, cache.row) for cache, _ in pooled] == [(long, 0), (short, 0), (long, 1)]
    captured = graphs_on_the_cpu(span)
    assert span.capture_decode_steps() == 3 + 4 and (len(short.graphs), len(long.graphs)) == (3, 4)
    generator = torch.Generator().manual_seed(10)
    for group in ([0, 2], [1], [2], [0, 2]):  # a batch is of one pool
        step_together_and_alone(span, reference, pooled, alone, group, generator)
    assert len(captured) == 7
    with pytest.raises(ValueError, match="rows of one pool"):
        span.forward_batch([(torch.randn(1, 1, span.hidden_size), *pooled[0]), (torch.randn(1, 1, span.hidden_size), *pooled[1])])


@pytest.mark.parametrize("fused", [False, True])
def test_batched_pool_steps_apply_the_shared_adapter(fused, checkpoints):
    """With the fused layers too: an adapter's steps keep transformers' layers, where its hooks are."""
    span, reference = pooled_span(checkpoints["llama"], 0, 4, fused=fused), BlockSpan(checkpoints["llama"], 0, 4)
    runs = counted_runs(span.fused) if fused else []
    generator = torch.Generator().manual_seed(2)
    adapter = random_span_lora(span, generator)
    pooled, alone = prefilled(span, [(1, 4), (1, 9)]), prefilled(reference, [(1, 4), (1, 9)])
    hidden = [torch.randn(1, 1, span.hidden_size, generator=generator) for _ in pooled]
    together = span.forward_batch([(h, c, p) for h, (c, p) in zip(hidden, pooled)], adapter)
    for h, out, (cache, position) in zip(hidden, together, alone):
        torch.testing.assert_close(out, reference.forward(h, cache=cache, position=position, adapter=adapter),
                                   atol=TOLERANCE, rtol=0)
    assert runs == []


def test_sessions_take_consecutive_rows_and_fall_back_to_their_own_buffers(checkpoints):
    span = pooled_span(checkpoints["llama"], 0, 2, rows=4, length=64)
    caches = SessionCaches(max_sessions=8, max_tokens=100_000, idle_timeout=60)
    first = caches.open("a", batch=2, max_length=32, cache=span.new_cache())
    span.forward(torch.randn(2, 3, span.hidden_size), cache=first.cache, position=0)
    # may grow past a row (a request without max_tokens reserves the whole context): rows go by what it holds
    may_grow = caches.open("b", batch=1, max_length=4096, cache=span.new_cache())
    span.forward(torch.randn(1, 3, span.hidden_size), cache=may_grow.cache, position=0)
    no_pair = caches.open("c", batch=2, max_length=64, cache=span.new_cache())  # one row free, not two
    span.forward(torch.randn(2, 3, span.hidden_size), cache=no_pair.cache, position=0)
    too_long = caches.open("d", batch=1, max_length=100, cache=span.new_cache())  # its prompt is longer than a row
    span.forward(torch.randn(1, 65, span.hidden_size), cache=too_long.cache, position=0)
    last = caches.open("e", batch=1, max_length=8, cache=span.new_cache())
    span.forward(torch.randn(1, 3, span.hidden_size), cache=last.cache, position=0)
    no_room = caches.open("f", batch=1, max_length=8, cache=span.new_cache())  # all 4 rows taken
    span.forward(torch.randn(1, 3, span.hidden_size), cache=no_room.cache, position=0)
    sessions = (first, may_grow, no_pair, too_long, last, no_room)
    assert [s.cache.row for s in sessions] == [0, 2, None, None, 3, None]
    assert [span.batches(s.cache) for s in sessions] == [True, True, False, False, True, False]
    caches.close("a")  # its rows are free again
    again = caches.open("g", batch=1, max_length=8, cache=span.new_cache())
    span.forward(torch.randn(1, 3, span.hidden_size), cache=again.cache, position=0)
    assert again.cache.row == 0


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_session_that_outgrows_its_rows_moves_to_longer_rows_then_to_buffers_of_its_own(graphs, checkpoints):
    """One-token steps past the end of a session's pool row move it to a row of the longer pool,
    where it batches on; past that, to buffers of its own; a prompt step across a row's end with
    no longer row free, to its own buffers too. Every move keeps every position and gives the rows
    back; each step equals the session's own on a DynamicCache."""
    span, reference = BlockSpan(checkpoints["llama"], 0, 3), BlockSpan(checkpoints["llama"], 0, 3)
    span.static_cache = True
    span.enable_slots(rows=2, length=64, longer=(1, 128))
    short, long = span.slot_pools
    if graphs:
        graphs_on_the_cpu(span)
    generator = torch.Generator().manual_seed(8)

    def step(session: list, tokens: int) -> None:
        cache, own, position = session
        hidden = torch.randn(1, tokens, span.hidden_size, generator=generator)
        out = (span.forward_batch([(hidden, cache, position)])[0] if tokens == 1 and span.batches(cache)
               else span.forward(hidden, cache=cache, position=position))
        torch.testing.assert_close(out, reference.forward(hidden, cache=own, position=position), atol=TOLERANCE, rtol=0)
        session[2] += tokens

    sessions = []
    for prompt in (61, 50):
        cache, own = span.new_cache(), reference.new_cache()
        cache.reserve(1, 4096)
        sessions.append([cache, own, 0])
        step(sessions[-1], prompt)
    first, second = sessions
    assert [first[0].row, second[0].row] == [0, 1] and first[0].pool is second[0].pool is short
    pools = []
    for _ in range(6):  # 61 -> 67 positions, a token at a time
        step(first, 1)
        pools.append(first[0].pool)
    assert pools == [short] * 3 + [long] * 3 and span.batches(first[0]) and first[0].row == 0
    step(second, 20)  # from 50 across its row's end: the longer pool's one row is taken
    assert not second[0].pooled and second[0].capacity >= 70
    assert short.take(2) == 0  # both short rows given back
    step(first, 128 - 67)
    assert first[0].pool is long
    step(first, 1)  # past the longer row too: buffers of its own, its row given back
    assert not first[0].pooled and long.take(1) == 0
    step(first, 1)
    step(second, 1)


def test_a_session_closed_while_its_step_is_in_a_batch_leaves_the_batch_whole(checkpoints):
    """Closing a session gives its rows back once, but a batch already holding its step still
    computes it in those rows; a released cache takes no rows again, even when it outgrows its own."""
    span, reference = pooled_span(checkpoints["llama"], 0, 2, rows=2, length=64), BlockSpan(checkpoints["llama"], 0, 2)
    (kept, kept_own, _), (closing, _, _) = [[c, o, 0] for c, o in
                                            zip([span.new_cache(), span.new_cache()], [reference.new_cache(), None])]
    generator = torch.Generator().manual_seed(9)
    prompt = torch.randn(1, 10, span.hidden_size, generator=generator)
    span.forward(prompt, cache=kept, position=0), reference.forward(prompt, cache=kept_own, position=0)
    span.forward(torch.randn(1, 10, span.hidden_size, generator=generator), cache=closing, position=0)
    closing.release()
    closing.release()
    assert span.slot_pool.take(1) == 1 and span.slot_pool.take(1) is None  # given back
    span.slot_pool.give_back(1, 1)
    hidden = torch.randn(1, 1, span.hidden_size, generator=generator)
    out = span.forward_batch([(hidden, kept, 10), (torch.randn(1, 1, span.hidden_size, generator=generator), closing, 10)])
    torch.testing.assert_close(out[0], reference.forward(hidden, cache=kept_own, position=10), atol=TOLERANCE, rtol=0)
    other = span.new_cache()  # a new session takes the row given back
    span.forward(torch.randn(1, 10, span.hidden_size, generator=generator), cache=other, position=0)
    span.forward(torch.randn(1, 60, span.hidden_size, generator=generator), cache=closing, position=11)  # past its row
    assert other.row == 1 and not closing.pooled and span.slot_pool.take(1) is None  # not given back twice


def test_pool_rows_and_buckets():
    pool = SlotPool(start=0, num_layers=1, kv_heads=1, head_dim=2, rows=4, length=8,
                    dtype=torch.float32, device="cpu")
    assert [pool.take(1), pool.take(2), pool.take(2), pool.take(1)] == [0, 1, None, 3]
    pool.give_back(1, 2)
    assert pool.take(2) == 1 and pool.take(1) is None
    assert [bucket(n, 64, floor=8) for n in (1, 8, 9, 33, 100)] == [8, 8, 16, 64, 64]


def test_a_servers_pools_are_three_quarters_of_its_cache_and_placement_counts_them():
    limits = ServerLimits()  # 64 batch rows, 64 sessions, 65536 cache tokens
    assert limits.decode_slots() == (64, 512, 4096, (8, 2048))  # a staging row of 4096; 8 rows of 2048
    assert limits.cache_memory_tokens("cuda") == 65536 + 64 * 512 + 8 * 2048 + 4096
    assert limits.cache_memory_tokens("cpu") == 65536
    assert ServerLimits(max_sessions=8, max_tokens=10_000).decode_slots() == (8, 576, 4096, (1, 2304))  # rounded down to 64


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_one_token_layers_compute_what_transformers_layers_do(family, tmp_path):
    """FusedDecode (q/k/v and gate/up concatenated, rotary at once, grouped attention without
    repeated keys) against transformers' layers of the same checkpoint, also for a view of the
    span (a server's part of it): float32 on the CPU, outputs and the keys and values written
    within 1e-6 (Qwen2's q/k/v biases, Qwen3's q/k norms included)."""
    path = build_checkpoint(tmp_path / family, family=family, num_layers=3, num_kv_heads=2)
    span, plain = BlockSpan(path, 1, 3), BlockSpan(path, 1, 3)
    assert fused_decode_supported(span.layers, span.config.model_type)
    span.fused = FusedDecode(span.layers, span.start)  # as on a GPU; its weights are now views
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randn(3, 10, span.hidden_size, generator=generator)
    hidden = torch.randn(3, 1, span.hidden_size, generator=generator)
    static = [StaticKV(start=1, num_layers=2, kv_heads=span.family.kv_heads(span.config), dtype=torch.float32,
                       head_dim=span.family.head_dim(span.config), device=torch.device("cpu")) for _ in range(2)]
    for cache in static:
        cache.reserve(3, 64)
        plain.forward(prompt, cache=cache, position=0)
        cache.write_at, cache.view_length = 10, cache.capacity
    masks = {kind: (torch.arange(static[0].capacity) <= 10).view(1, 1, 1, -1) for kind in span._mask_layer}
    positions = torch.full((3, 1), 10)
    embeddings = span.family.position_embeddings(span.rotary_emb, hidden, positions, list(masks))
    view = span.view(2, 3)
    runs = [counted_runs(span.fused), counted_runs(view.fused)]
    with torch.inference_mode():
        for ours, theirs in ((span, plain), (view, plain.view(2, 3))):
            fused = ours._run_layers(hidden, static[1], masks, embeddings, positions)
            expected = theirs._run_layers(hidden, static[0], masks, embeddings, positions)
            torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
            for mine, reference in zip(static[1].keys + static[1].values, static[0].keys + static[0].values):
                torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)
    assert runs == [[3], [3]]


def test_families_outside_the_llama_layer_keep_transformers_layers(checkpoints):
    for name in ("gemma3", "mixtral", "phi3"):
        span = BlockSpan(checkpoints[name], 0, 2)
        assert not fused_decode_supported(span.layers, span.config.model_type), name
