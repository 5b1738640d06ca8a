"""Prefix caching (blocks/prefix_cache.py): a prompt that starts like an earlier one reuses the
cached blocks of that start, and what it computes — outputs and the cache its next steps use —
equals computing it all (float32, 1e-5). Other adapters never share; memory is bounded. Keys
over the wire bytes are the same however a prompt is cut into steps.
"""

from __future__ import annotations

import pytest
import torch

from blocks.prefix_cache import BLOCK, CachedBlock, Prefix, PrefixCache, chain_keys, tensor_blocks
from blocks.span import BlockSpan
from swarm import codec
from swarm.prompt_names import PrefixMemory

TOLERANCE = 1e-5


def _prompt(tokens: int, seed: int, hidden: int) -> torch.Tensor:
    return torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(seed))


def _plain(span: BlockSpan, prompt: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = span.new_cache()
    outputs = [span.forward(prompt, cache=cache, position=0)]
    for index, step in enumerate(steps):
        outputs.append(span.forward(step, cache=cache, position=prompt.shape[1] + index))
    return outputs


def _cached(span: BlockSpan, prefixes: PrefixCache, prompt: torch.Tensor, steps: list[torch.Tensor],
            namespace: str = "ns") -> tuple[list[torch.Tensor], int]:
    cache = span.new_cache()
    output, reused = prefixes.prefill(span, prompt, cache, namespace)
    outputs = [output]
    for index, step in enumerate(steps):
        outputs.append(span.forward(step, cache=cache, position=prompt.shape[1] + index))
    return outputs, reused


def test_a_prompts_output_from_any_position_joins_only_the_blocks_from_there():
    """What a hop sends on after the blocks it names, or a chain's end its tail: the cached blocks'
    outputs then the computed rest, from any position, equal to slicing the whole output."""
    blocks = [_prompt(BLOCK, seed, 8) for seed in range(3)]
    prefix = Prefix([b"k%d" % i for i in range(4)], [CachedBlock(torch.empty(0), block, None) for block in blocks])
    computed = _prompt(7, 9, 8)
    whole = torch.cat([*blocks, computed], dim=1)
    for start in (0, 5, BLOCK, BLOCK + 1, 3 * BLOCK - 1, 3 * BLOCK, 3 * BLOCK + 4, whole.shape[1] - 1):
        assert torch.equal(prefix.output_from(computed, start), whole[:, start:]), start
    assert prefix.output_from(computed, 3 * BLOCK + 4).data_ptr() == computed[:, 4:].data_ptr()  # past them: no copy


def test_a_shared_start_is_reused_and_what_follows_is_exact(llama_path):
    span = BlockSpan(llama_path, 1, 3)
    prefixes = PrefixCache(max_tokens=16 * BLOCK)
    first = _prompt(2 * BLOCK + 10, 0, span.hidden_size)
    second = torch.cat([first[:, : 2 * BLOCK + 3], _prompt(40, 1, span.hidden_size)], dim=1)  # diverges in block 2
    steps = [_prompt(1, 10 + i, span.hidden_size) for i in range(3)]

    outputs, reused = _cached(span, prefixes, first, steps)
    assert reused == 0 and prefixes.tokens == 2 * BLOCK
    for got, want in zip(outputs, _plain(span, first, steps)):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)

    again, reused = _cached(span, prefixes, first, steps)  # the same prompt: both whole blocks
    assert reused == 2 * BLOCK
    for got, want in zip(again, outputs):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)

    diverged, reused = _cached(span, prefixes, second, steps)  # shares two blocks, then its own tokens
    assert reused == 2 * BLOCK
    for got, want in zip(diverged, _plain(span, second, steps)):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_static_caches_reuse_prefixes_too(llama_path):
    """The GPU's static caches (here their pool rows, run eagerly on the CPU): a cached start is
    written into the session's rows, and the rest and later steps equal computing it all."""
    span, plain = BlockSpan(llama_path, 1, 3), BlockSpan(llama_path, 1, 3)
    span.static_cache = True
    span.enable_slots(rows=4, length=4 * BLOCK)
    prefixes = PrefixCache(max_tokens=16 * BLOCK)
    first = _prompt(2 * BLOCK + 10, 0, span.hidden_size)
    second = torch.cat([first[:, : BLOCK + 5], _prompt(30, 1, span.hidden_size)], dim=1)
    steps = [_prompt(1, 10 + i, span.hidden_size) for i in range(3)]
    _cached(span, prefixes, first, steps)
    outputs, reused = _cached(span, prefixes, second, steps)
    assert reused == BLOCK and span.caches_prefixes(span.new_cache())
    for got, want in zip(outputs, _plain(plain, second, steps)):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_a_prefix_never_serves_another_namespace_and_the_cache_stays_bounded(llama_path):
    span = BlockSpan(llama_path, 0, 2)
    prefixes = PrefixCache(max_tokens=3 * BLOCK)
    prompt = _prompt(2 * BLOCK + 1, 0, span.hidden_size)
    assert _cached(span, prefixes, prompt, [], namespace="adapter-a")[1] == 0
    assert _cached(span, prefixes, prompt, [], namespace="adapter-b")[1] == 0  # another adapter: computed
    assert _cached(span, prefixes, prompt, [], namespace="adapter-b")[1] == 2 * BLOCK
    assert prefixes.tokens == 3 * BLOCK  # 4 blocks stored, the least recently used one dropped:
    assert _cached(span, prefixes, prompt, [], namespace="adapter-a")[1] == BLOCK  # a's last, so its first is found


def test_the_whole_prompt_is_never_served_from_the_cache(llama_path):
    span = BlockSpan(llama_path, 0, 4)
    prefixes = PrefixCache(max_tokens=8 * BLOCK)
    prompt = _prompt(2 * BLOCK, 3, span.hidden_size)  # exactly two blocks: the last token is computed
    _cached(span, prefixes, prompt, [])
    outputs, reused = _cached(span, prefixes, prompt, [])
    assert reused == BLOCK
    torch.testing.assert_close(outputs[0], _plain(span, prompt, [])[0], atol=TOLERANCE, rtol=0)


def test_bfloat16_prompts_are_keyed_too(llama_path):
    """A bf16 span (numpy has no bfloat16) keys, stores and reuses blocks as a float32 one does."""
    span = BlockSpan(llama_path, 0, 2, dtype=torch.bfloat16)
    prefixes = PrefixCache(max_tokens=4 * BLOCK)
    prompt = _prompt(BLOCK + 5, 7, span.hidden_size).to(torch.bfloat16)
    assert _cached(span, prefixes, prompt, [])[1] == 0
    assert _cached(span, prefixes, prompt, [])[1] == BLOCK


# -- keys over the wire bytes, and what a client remembers of them (swarm/prompt_names.py) -----------

@pytest.mark.parametrize("name", codec.CODECS)
def test_a_blocks_key_is_the_same_whether_it_is_sent_alone_or_within_a_prompt(name):
    """A server keys what a prompt step carries, which may start after blocks named by their keys:
    the chained keys of blocks encoded within the whole prompt equal those of the same blocks
    encoded apart (int8's scale blocks never straddle two token blocks), and any change in any
    earlier block changes every key after it."""
    hidden = torch.randn(1, 3 * BLOCK + 5, 128)
    whole = chain_keys(codec.token_blocks(codec.encode(hidden, name), BLOCK, 3))
    start = chain_keys(codec.token_blocks(codec.encode(hidden[:, :BLOCK], name), BLOCK, 1))
    rest = chain_keys(codec.token_blocks(codec.encode(hidden[:, BLOCK:], name), BLOCK, 2), start[-1])
    assert whole == start + rest and len(set(whole)) == 3
    changed = hidden.clone()
    changed[0, 3, 7] += 1.0
    assert set(chain_keys(codec.token_blocks(codec.encode(changed, name), BLOCK, 3))).isdisjoint(whole)
    assert chain_keys(codec.token_blocks(codec.encode(hidden, name), BLOCK, 2, skip=1), start[-1]) == rest


def test_int8_blocks_straddling_token_blocks_give_no_keys():
    hidden = torch.randn(1, 2 * BLOCK, 6)  # 96 elements a block: int8 scales over 64 would straddle them
    assert codec.token_blocks(codec.encode(hidden, "int8"), BLOCK, 2) == []


def test_a_client_remembers_which_blocks_a_place_holds_least_recently_used_forgotten_first():
    memory = PrefixMemory(max_keys=4)
    memory.remember("server-a", [b"k1", b"k2", b"k3"])
    assert memory.held("server-a", [b"k1", b"k2", b"k3", b"k4"]) == 3
    assert memory.held("server-b", [b"k1"]) == 0  # another place (server, span, adapter, codec)
    assert memory.held("server-a", [b"k2", b"k3"]) == 2 and memory.held("server-a", [b"x", b"k1"]) == 0
    memory.remember("server-b", [b"k1", b"k9"])  # 5 keys: server-a's k1 (least recently used) goes
    assert memory.held("server-a", [b"k1", b"k2"]) == 0 and memory.held("server-a", [b"k2"]) == 1


def test_a_prompt_longer_than_the_cache_keeps_its_start(llama_path):
    """A chain is evicted from its end: what stays of a prompt that overflows the cache is its
    first blocks, which the next lookup finds (a cache of its last blocks would find nothing)."""
    span = BlockSpan(llama_path, 0, 2)
    prefixes = PrefixCache(max_tokens=3 * BLOCK)
    prompt = _prompt(5 * BLOCK + 1, 0, span.hidden_size)
    assert _cached(span, prefixes, prompt, [])[1] == 0
    assert _cached(span, prefixes, prompt, [])[1] == 3 * BLOCK


def test_blocks_stored_without_their_outputs_keys_get_them_later(llama_path):
    """Blocks cached where the span had no next hop keep no keys for their outputs; once a later
    prompt computes those keys, the blocks hold them (an existing key is never replaced)."""
    span = BlockSpan(llama_path, 0, 2)
    prefixes = PrefixCache(max_tokens=8 * BLOCK)
    prompt = _prompt(3 * BLOCK + 1, 0, span.hidden_size)
    _cached(span, prefixes, prompt, [])
    keys = chain_keys([part] for part in (b"a", b"b", b"c"))
    found = prefixes.find("ns", chain_keys(tensor_blocks(prompt, 3)))
    assert len(found.found) == 3 and found.output_keys() == []
    prefixes.name_outputs("ns", found.keys[:2], keys[:2])
    assert prefixes.find("ns", found.keys).output_keys() == keys[:2]
    prefixes.name_outputs("ns", found.keys, [b"x", b"y", keys[2]])
    assert prefixes.find("ns", found.keys).output_keys() == keys
