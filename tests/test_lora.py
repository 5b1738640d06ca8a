"""LoRA: per-request adapters on spans, training through real servers, adapter files.

Stated tolerance for gradients through the swarm (float32 on the wire): for every LoRA tensor,
max |g_swarm - g_peft| <= 1e-4 * max |g_peft|. Logits through the swarm with an adapter are
within 1e-4 of local peft's, and greedy tokens are equal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import trio
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adapters import AdapterError, AdapterStore, LoraAdapter, create_adapter, import_adapter, lora_config
from adapters import files as adapter_files
from adapters.adapter import CONFIG_FILE, WEIGHTS_FILE
from blockserver.training import AdapterCache, UnknownAdapterError
from blocks.checkpoint import load_config
from blocks.head import ModelHead
from blocks.lora import LoraError, SpanLora
from blockserver.limits import ServerLimits
from blocks.span import BlockSpan
from blockserver.training import KeptInputs, TrainingService
from swarm import codec, protocol, training
from blocks.lora_weights import ATTENTION_MODULES, SUPPORTED_MODULES, LoraWeights
from tests.support import free_port, wait_until
from tests.swarm_harness import running_swarm, swarm_greedy

MAX_TRAIN_TOKENS = 256
GRAD_TOLERANCE = 1e-4


def _trained(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The adapter with every tensor moved off its init (lora_B = 0 would hide lora_A's gradients)."""
    generator = torch.Generator().manual_seed(seed)
    return adapter.with_tensors(
        {n: t + 0.2 * torch.randn(t.shape, generator=generator) for n, t in adapter.tensors.items()}
    )


def _peft_model(base: Path, adapter: LoraAdapter, folder: Path) -> PeftModel:
    """Plain peft on a local copy of the base, loading the adapter as saved by adapters/."""
    if not folder.exists():
        adapter_files.save_adapter(adapter, folder)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, folder, is_trainable=True).eval()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, padding (-100) ignored."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _batch(vocab: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and labels (-100 on padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=generator)
    labels = ids.clone()
    for row, length in enumerate(lengths):
        labels[row, length:] = -100
    return ids, labels


def _grads_of(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, reference in expected.items():
        error = (got[name] - reference).abs().max().item()
        assert error <= GRAD_TOLERANCE * reference.abs().max().item(), (name, error)


# -- spans, in process ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_span_forward_and_backward_equal_peft(name, tiny_models, tmp_path):
    """Two spans with LoRA on every supported module: logits and LoRA gradients as peft's."""
    path = tiny_models[name]
    adapter = _trained(create_adapter(path, base_name=name, r=4, alpha=8, target_modules=SUPPORTED_MODULES), 1)
    head, n = ModelHead(path), load_config(path).num_hidden_layers
    spans = [BlockSpan(path, 0, 1), BlockSpan(path, 1, n)]
    loras = [SpanLora.build(s.lora_targets, adapter.weights().span(s.start, s.end), s.device) for s in spans]
    ids, labels = _batch(head.vocab_size, [12, 7], seed=2)

    inputs = [head.embed(ids)]
    inputs.append(spans[0].forward(inputs[0], adapter=loras[0]))
    output = spans[1].forward(inputs[1], adapter=loras[1]).clone().requires_grad_(True)
    _loss(head.differentiable_logits(output), labels).backward()
    grad_mid, grads = spans[1].backward(inputs[1], output.grad, loras[1])
    first_input_grad, first_grads = spans[0].backward(inputs[0], grad_mid, loras[0])
    no_input_grad, same_grads = spans[0].backward(inputs[0], grad_mid, loras[0], input_grad=False)
    assert first_input_grad.shape == inputs[0].shape and no_input_grad is None
    for grad_name, grad in first_grads.items():
        torch.testing.assert_close(same_grads[grad_name], grad, atol=0, rtol=0)
    grads |= first_grads

    reference = _peft_model(path, adapter, tmp_path / "adapter")
    logits = reference(ids).logits
    _loss(logits, labels).backward()
    torch.testing.assert_close(head.logits(output), logits.detach(), atol=1e-5, rtol=0)
    _assert_grads_close(grads, _grads_of(reference))
    # The shared modules are untouched: without an adapter the span is the base model again.
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = spans[1].forward(spans[0].forward(head.embed(ids)))
        torch.testing.assert_close(head.logits(hidden), base(ids).logits, atol=1e-5, rtol=0)


def test_span_lora_refuses_what_does_not_fit(llama_path):
    span = BlockSpan(llama_path, 2, 4)
    weights = create_adapter(llama_path, base_name="llama", r=4, alpha=8).weights()
    build = lambda tensors: SpanLora.build(span.lora_targets, LoraWeights(tensors, 2.0), span.device)  # noqa: E731
    ours = weights.span(2, 4).tensors
    with pytest.raises(LoraError, match="layer 0 is not served here"):
        build(weights.span(0, 1).tensors)
    a_name = next(n for n in ours if n.endswith("q_proj.lora_A.weight"))
    with pytest.raises(LoraError, match="expected lora_A"):
        build({**ours, a_name: torch.zeros(4, 3)})
    with pytest.raises(LoraError, match="needs both"):
        build({a_name: ours[a_name]})
    with pytest.raises(LoraError, match="not a LoRA tensor"):
        build({"model.layers.2.self_attn.q_proj.weight": torch.zeros(1)})
    assert build(ours).nbytes == sum(t.numel() * 4 for t in ours.values())


def test_adapter_cache_evicts_least_recently_used(llama_path):
    span = BlockSpan(llama_path, 0, 1)
    one = SpanLora.build(span.lora_targets, create_adapter(llama_path, base_name="l", r=2).weights().span(0, 1), span.device)
    cache = AdapterCache(max_bytes=2 * one.nbytes)
    cache.put("a", one), cache.put("b", one)
    cache.get("a")  # now b is the least recently used
    cache.put("c", one)
    assert cache.get("a") is one and cache.get("c") is one
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'b': upload"):
        cache.get("b")
    with pytest.raises(LoraError, match="exceeds this server's cache"):
        AdapterCache(max_bytes=one.nbytes - 1).put("d", one)


def test_a_server_that_moves_forgets_the_old_spans_adapters(llama_path):
    old, new = BlockSpan(llama_path, 0, 2), BlockSpan(llama_path, 2, 4)
    service = TrainingService(old, ServerLimits(), trio.CapacityLimiter(1))
    weights = create_adapter(llama_path, base_name="llama", r=2).weights().span(0, 2)
    service.adapters.put(weights.digest, SpanLora.build(old.lora_targets, weights, old.device))
    service.span = new  # its layers are not the ones the adapter was built for
    with pytest.raises(UnknownAdapterError):
        service.session_adapter({"adapter": weights.digest})


# -- through real servers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_swarm(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    logs = tmp_path_factory.mktemp("lora-logs")
    with running_swarm(path, ["0:2", "2:4"], extra_args=["--max-train-tokens", str(MAX_TRAIN_TOKENS)],
                       log_dir=logs) as (servers, bridge):
        yield path, servers, bridge


@pytest.fixture(scope="module")
def tenant_adapters(tiny_models, tmp_path_factory):
    """Two different trained adapters of the llama base, saved, and their local peft twins."""
    path = tiny_models["llama"]
    root = tmp_path_factory.mktemp("tenant-adapters")
    adapters = [_trained(create_adapter(path, base_name="llama", r=4, alpha=8, seed=s), s) for s in (1, 2)]
    return [(a, _peft_model(path, a, root / f"adapter-{i}")) for i, a in enumerate(adapters)]


@pytest.mark.e2e
def test_lora_gradients_through_swarm_equal_peft(lora_swarm, tmp_path, monkeypatch):
    path, _, bridge = lora_swarm
    head = ModelHead(path)
    fresh = create_adapter(path, base_name="llama", r=4, alpha=8, target_modules=SUPPORTED_MODULES, seed=7)
    torch.manual_seed(7)
    peft_init = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path), lora_config("llama", r=4, alpha=8, target_modules=SUPPORTED_MODULES)
    )
    assert all(torch.equal(fresh.tensors[n], p) for n, p in _named_lora(peft_init).items())  # same init
    adapter = _trained(fresh, 7)
    ids, labels = _batch(head.vocab_size, [16, 9, 12], seed=3)

    replies: list[tuple[int, bool, bool]] = []  # (span start, input resent, grad_input in the reply) per backward
    call = training._call

    keeps: list[bool] = []  # what each forward asked of its server

    async def recording(client, record, weights, request, reply_type):
        reply = await call(client, record, weights, request, reply_type)
        if request["type"] == "backward":
            replies.append((record.start, "hidden" in request, "grad_input" in reply))
        else:
            keeps.append(request["keep"])
        return reply

    params = {n: t.clone().requires_grad_(True) for n, t in adapter.tensors.items()}
    monkeypatch.setattr(training, "_call", recording)
    hidden = training.remote_blocks(bridge.call, bridge.client, path.name, 4, head.embed(ids),
                                    LoraWeights(params, adapter.scaling))
    loss = _loss(head.differentiable_logits(hidden), labels)
    loss.backward()
    # the servers kept each span's input from the forward: no backward sends it again; the
    # embeddings are frozen: the first span sends back no gradient for its input
    assert sorted(replies) == [(0, False, False), (2, False, True)], replies
    with torch.no_grad():  # an evaluation: no backward follows, so nothing is kept for one
        training.remote_blocks(bridge.call, bridge.client, path.name, 4, head.embed(ids), LoraWeights(params, 2.0))
    assert keeps == [True, True, False, False], keeps

    reference = _peft_model(path, adapter, tmp_path / "adapter")
    expected_loss = _loss(reference(ids).logits, labels)
    expected_loss.backward()
    assert abs(loss.item() - expected_loss.item()) < 1e-5
    _assert_grads_close({n: p.grad for n, p in params.items()}, _grads_of(reference))

    # The same forward from asyncio, through the bridge's one generic entry point.
    async def from_asyncio() -> torch.Tensor:
        output, _ = await bridge.run(lambda: training.forward(
            bridge.client, path.name, 4, head.embed(ids), adapter.weights()))
        return output

    torch.testing.assert_close(asyncio.run(from_asyncio()), hidden.detach(), atol=0, rtol=0)


def _named_lora(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.e2e
def test_session_with_adapter_gives_peft_output(lora_swarm, tenant_adapters):
    path, _, bridge = lora_swarm
    (adapter, reference), _ = tenant_adapters
    head = ModelHead(path)
    prompt = _batch(head.vocab_size, [10], seed=4)[0]
    tokens, first_logits = swarm_greedy(bridge, head, path.name, prompt, 8, wire_codec="none",
                                        adapter=adapter.weights())
    with torch.no_grad():
        expected = reference.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        local_logits = reference(prompt).logits[:, -1]
    assert tokens == expected[:, prompt.shape[1]:].tolist()
    torch.testing.assert_close(first_logits, local_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_concurrent_sessions_with_different_adapters(lora_swarm, tenant_adapters):
    path, _, bridge = lora_swarm
    head = ModelHead(path)
    prompt = _batch(head.vocab_size, [9], seed=5)[0]  # the same prompt: only the adapters differ
    weights = [adapter.weights() for adapter, _ in tenant_adapters] + [None]
    results: dict[int, list[int]] = {}

    async def one(index: int) -> None:
        session = await bridge.client.open_session(path.name, 4, max_length=30, wire_codec="none",
                                                   adapter=weights[index])
        async with session:
            logits = head.logits(await session.step(head.embed(prompt)))[:, -1]
            out = []
            for _ in range(8):
                token = logits.argmax(-1, keepdim=True)
                out.append(int(token))
                await trio.sleep(0.002 * index)  # interleave the sessions' steps
                logits = head.logits(await session.step(head.embed(token)))[:, -1]
            results[index] = out

    async def all_sessions() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(len(weights)):
                nursery.start_soon(one, index)

    bridge.call(all_sessions)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    references = [model for _, model in tenant_adapters] + [base]
    expected = []
    for model in references:
        with torch.no_grad():
            tokens = model.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected.append(tokens[0, prompt.shape[1]:].tolist())
    assert [results[i] for i in range(len(weights))] == expected
    assert len({tuple(e) for e in expected}) > 1, "adapters should change the output"


@pytest.mark.e2e
def test_evicted_adapter_is_uploaded_again(lora_swarm, tenant_adapters):
    path, _, bridge = lora_swarm
    weights = _trained(tenant_adapters[0][0], 11).weights()
    for record in bridge.servers(path.name):  # the client believes the servers hold it; they do not
        bridge.client.uploads._held[(record.peer_id, weights.span(record.start, record.end).digest)] = None
    head = ModelHead(path)
    hidden = head.embed(_batch(head.vocab_size, [6], seed=6)[0])
    output, context = bridge.call(lambda: training.forward(bridge.client, path.name, 4, hidden, weights))
    grad_input, grads = bridge.call(lambda: training.backward(context, torch.ones_like(output)))
    assert grad_input.shape == hidden.shape and set(grads) == set(weights.tensors)


@pytest.mark.e2e
def test_a_backward_whose_kept_input_is_gone_sends_it(lora_swarm, tenant_adapters):
    """A server that no longer holds a forward's input (evicted, expired, restarted) answers
    `unknown_input`; the backward sends the input then, and its gradients are those of a backward
    that found it kept."""
    path, _, bridge = lora_swarm
    weights = _trained(tenant_adapters[0][0], 13).weights()
    head = ModelHead(path)
    hidden = head.embed(_batch(head.vocab_size, [9], seed=9)[0])

    def gradients(forget: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        output, context = bridge.call(lambda: training.forward(bridge.client, path.name, 4, hidden, weights,
                                                               keep=True))
        assert all(hop.kept for hop in context.hops)
        if forget:
            context = dataclasses.replace(context, hops=tuple(dataclasses.replace(hop, kept="0" * 32)
                                                              for hop in context.hops))
        return bridge.call(lambda: training.backward(context, torch.ones_like(output)))

    kept_input, kept_grads = gradients(forget=False)
    resent_input, resent_grads = gradients(forget=True)
    torch.testing.assert_close(resent_input, kept_input, atol=0, rtol=0)
    for name, grad in kept_grads.items():
        torch.testing.assert_close(resent_grads[name], grad, atol=0, rtol=0)


@pytest.mark.e2e
def test_a_server_frees_kept_inputs_whose_backward_never_comes(tiny_models, tmp_path):
    """A real server process keeps a training forward's input (its /metrics count the bytes) and
    frees it once the idle timeout passes, with no request coming to notice it."""
    path, port = tiny_models["llama"], free_port()
    with running_swarm(path, ["0:4"], extra_args=["--session-idle-timeout", "2", "--metrics-port", str(port)],
                       log_dir=tmp_path) as (_, bridge):
        def kept_bytes() -> float:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return next(float(line.split()[1]) for line in metrics.splitlines()
                        if line.startswith("swarmgate_server_train_kept_bytes "))

        head = ModelHead(path)
        hidden = head.embed(_batch(head.vocab_size, [7], seed=3)[0])
        weights = create_adapter(path, base_name="llama", r=4, alpha=8, seed=3).weights()
        _, context = bridge.call(lambda: training.forward(bridge.client, path.name, 4, hidden, weights, keep=True))
        kept_at = time.monotonic()
        assert context.hops[0].kept and kept_bytes() == hidden.numel() * hidden.element_size()
        wait_until(lambda: kept_bytes() == 0, 15)
        assert time.monotonic() - kept_at >= 1.0  # the timeout, not at once


def test_kept_inputs_are_bounded_short_lived_and_their_keepers_own(monkeypatch):
    kept = KeptInputs(max_bytes=3 * 400, ttl=60.0)  # three [1, 10, 10] float32 inputs
    inputs = [torch.full((1, 10, 10), float(i)) for i in range(4)]
    keys = [kept.put("peer-a", x) for x in inputs]
    assert kept.bytes == 3 * 400 and kept.take("peer-a", keys[0]) is None  # the oldest made room
    assert kept.take("peer-b", keys[1]) is None  # not the keeper's
    assert torch.equal(kept.take("peer-a", keys[1]), inputs[1]) and kept.take("peer-a", keys[1]) is None  # once
    assert kept.put("peer-a", torch.zeros(1, 40, 10)) is None  # alone larger than the bound
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert kept.take("peer-a", keys[2]) is None and kept.bytes == 0  # expired


@pytest.mark.e2e
def test_adapter_on_some_layers_only(lora_swarm, tmp_path):
    """PEFT's layers_to_transform: the server of layers 2-3 gets no tensors and runs bare."""
    path, _, bridge = lora_swarm
    full = _trained(create_adapter(path, base_name="llama", r=4, alpha=8, seed=5), 5)
    adapter = LoraAdapter({**full.config, "layers_to_transform": [0, 1]},
                          {n: t for n, t in full.tensors.items() if ".layers.0." in n or ".layers.1." in n})
    adapter.check(load_config(path), "llama")
    head, reference = ModelHead(path), _peft_model(path, adapter, tmp_path / "partial")
    prompt = _batch(head.vocab_size, [7], seed=8)[0]
    _, logits = swarm_greedy(bridge, head, path.name, prompt, 1, wire_codec="none", adapter=adapter.weights())
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(prompt).logits[:, -1], atol=1e-4, rtol=1e-4)
    output, context = bridge.call(lambda: training.forward(bridge.client, path.name, 4, head.embed(prompt),
                                                           adapter.weights()))
    _, grads = bridge.call(lambda: training.backward(context, torch.ones_like(output)))
    assert set(grads) == set(adapter.tensors)


def _train_request(bridge, record, request: dict) -> dict:
    async def exchange() -> dict:
        stream = await bridge.client.node.open_stream(record.peer_id, protocol.TRAIN, record.addrs)
        try:
            await protocol.write_frame(stream, request)
            with trio.fail_after(20):
                return await protocol.read_frame(stream)
        finally:
            await stream.close()

    return bridge.call(exchange)


@pytest.mark.e2e
def test_bad_training_requests_get_clear_errors(lora_swarm, tenant_adapters):
    path, _, bridge = lora_swarm
    record = min(bridge.servers(path.name), key=lambda r: r.start)
    hidden_size = ModelHead(path).hidden_size
    unknown = "0" * 64

    async def open_with_unknown_adapter() -> protocol.RemoteError:
        with pytest.raises(protocol.RemoteError) as refused:
            stream = await bridge.client.node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
            try:
                await protocol.write_frame(stream, {"type": "open", "session": "lora-session-01", "batch": 1,
                                                    "max_length": 8, "codec": "none", "adapter": unknown})
                protocol.expect(await protocol.read_frame(stream), "opened")
            finally:
                await stream.close()
        return refused.value

    refused = bridge.call(open_with_unknown_adapter)
    assert refused.code == protocol.UNKNOWN_ADAPTER and "unknown adapter" in str(refused)

    def hidden(tokens: int) -> dict:
        return codec.encode(torch.randn(1, tokens, hidden_size), "none")

    reply = _train_request(bridge, record, {"type": "forward", "adapter": unknown, "codec": "none", "hidden": hidden(4)})
    assert reply["code"] == protocol.UNKNOWN_ADAPTER and "upload" in reply["message"]

    span = tenant_adapters[0][0].weights().span(record.start, record.end)
    upload = {"type": "upload", "adapter": span.digest, "scaling": span.scaling,
              "tensors": {n: codec.encode(t, "none") for n, t in span.tensors.items()}}
    assert _train_request(bridge, record, upload)["type"] == "stored"
    reply = _train_request(bridge, record, {**upload, "adapter": unknown})
    assert "digest mismatch" in reply["message"]
    name = next(iter(span.tensors))
    wrong = {**upload["tensors"], name: codec.encode(torch.zeros(3, 3), "none")}
    reply = _train_request(bridge, record, {**upload, "tensors": wrong, "adapter": LoraWeights(
        {**span.tensors, name: torch.zeros(3, 3)}, span.scaling).digest})
    assert reply["type"] == "error" and "expected lora_" in reply["message"]

    oversized = {"type": "backward", "adapter": span.digest, "codec": "none",
                 "hidden": hidden(MAX_TRAIN_TOKENS + 1), "grad": hidden(MAX_TRAIN_TOKENS + 1)}
    reply = _train_request(bridge, record, oversized)
    assert f"exceed this server's limit of {MAX_TRAIN_TOKENS}" in reply["message"]
    assert reply["code"] == protocol.INVALID  # no point in trying another server
    reply = _train_request(bridge, record, {**oversized, "blocks": [record.start, record.end + 1]})
    assert reply["code"] == "error" and f"serves blocks [{record.start}, {record.end})" in reply["message"]
    reply = _train_request(bridge, record, {"type": "backward", "adapter": span.digest, "codec": "none",
                                            "hidden": hidden(4), "grad": hidden(5)})
    assert "must have the shape" in reply["message"]
    reply = _train_request(bridge, record, {"type": "backward", "adapter": span.digest, "codec": "none",
                                            "kept": "0" * 32, "grad": hidden(4)})
    assert reply["code"] == protocol.UNKNOWN_INPUT and "send it" in reply["message"]
    reply = _train_request(bridge, record, {"type": "backward", "adapter": span.digest, "codec": "none",
                                            "hidden": hidden(4), "grad": hidden(4), "input_grad": "no"})
    assert reply["code"] == protocol.INVALID and "'input_grad' must be a boolean" in reply["message"]
    reply = _train_request(bridge, record, {"type": "forward", "adapter": span.digest, "codec": "none",
                                            "hidden": hidden(4)})
    assert reply["type"] == "output"  # the server keeps serving after bad requests


# -- adapters/: files, hashes, archives, validation -------------------------------------------------

def test_adapter_save_load_hash_and_write_once(llama_path, tmp_path, monkeypatch):
    adapter = create_adapter(llama_path, base_name="llama", r=4, alpha=8, seed=1)
    folder = adapter_files.save_adapter(adapter, tmp_path / "a")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = adapter_files.load_adapter(folder)
    assert loaded.digest == adapter.digest and loaded.scaling == 2.0
    assert _trained(adapter, 1).digest != adapter.digest
    assert LoraAdapter({**adapter.config, "lora_alpha": 4}, adapter.tensors).digest != adapter.digest
    assert adapter_files.save_adapter(adapter, folder) == folder  # the same again: a no-op
    with pytest.raises(FileExistsError):
        adapter_files.save_adapter(_trained(adapter, 1), folder)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_files, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        adapter_files.save_adapter(adapter, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing half-written, no temporaries


def test_export_import_roundtrip_and_plain_peft_files(llama_path, tmp_path):
    base = load_config(llama_path)
    adapter = _trained(create_adapter(llama_path, base_name="llama", r=4, alpha=8, seed=2), 2)
    store = AdapterStore(tmp_path / "store")
    store.save("tenant-a", "ft-1", adapter)
    assert store.names("tenant-a") == ["ft-1"] and store.names("tenant-b") == []
    archive = store.export("tenant-a", "ft-1")
    assert import_adapter(archive, base, "llama").digest == adapter.digest

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar if m.isfile()}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        for name, data in members.items():
            z.writestr(f"some/dir/{name}", data)
    assert import_adapter(zipped.getvalue(), base, "org/llama").digest == adapter.digest

    # An adapter saved by peft itself, in half precision: imported as float32, as peft loads it.
    peft_dir = tmp_path / "peft-saved"
    model = _peft_model(llama_path, adapter, tmp_path / "ours")
    model.to(torch.float16).save_pretrained(peft_dir)
    imported = import_adapter(peft_dir, base, "llama")
    assert imported.tensors.keys() == adapter.tensors.keys()
    assert all(t.dtype == torch.float32 for t in imported.tensors.values())
    torch.testing.assert_close(dict(imported.tensors), {n: t.half().float() for n, t in adapter.tensors.items()})

    with pytest.raises(ValueError, match="not a valid"):
        store.path("tenant-a", "../tenant-b")
    store.delete("tenant-a", "ft-1")
    assert store.names("tenant-a") == [] and not store.exists("tenant-a", "ft-1")


def _archive(config: dict, tensors: dict) -> bytes:
    from safetensors.torch import save

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in ((CONFIG_FILE, json.dumps(config).encode()), (WEIGHTS_FILE, save(tensors))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("change, message", [
    (lambda c, t: ({**c, "peft_type": "IA3"}, t), "not a LoRA adapter"),
    (lambda c, t: ({**c, "use_dora": True}, t), "unsupported LoRA options: use_dora"),
    (lambda c, t: ({**c, "modules_to_save": ["lm_head"]}, t), "unsupported LoRA options: modules_to_save"),
    (lambda c, t: ({**c, "target_modules": ["q_proj", "embed_tokens"]}, t), "target_modules must be"),
    (lambda c, t: ({**c, "base_model_name_or_path": "mistral-7b"}, t), "for base model 'mistral-7b'"),
    (lambda c, t: (c, {n.replace("layers.3.", "layers.9."): v for n, v in t.items()}), "no layer 9"),
    (lambda c, t: (c, {n: v[:, :2].contiguous() if "lora_B" in n else v for n, v in t.items()}), "expected a float tensor"),
    (lambda c, t: (c, {n: v for n, v in t.items() if "lora_B" not in n}), "needs both"),
    (lambda c, t: ({**c, "r": 257}, t), r"r must be an integer in \[1, 256\]"),
])
def test_import_refuses_what_the_swarm_cannot_serve(change, message, llama_path):
    adapter = create_adapter(llama_path, base_name="llama", r=4, alpha=8, target_modules=ATTENTION_MODULES)
    config, tensors = change(dict(adapter.config), dict(adapter.tensors))
    with pytest.raises(AdapterError, match=message):
        import_adapter(_archive(config, tensors), load_config(llama_path), "llama")


def test_an_archive_unpacking_past_its_limit_is_refused(llama_path):
    """A small archive may unpack to gigabytes (zeros compress): refused past `max_bytes`."""
    adapter = create_adapter(llama_path, base_name="llama", r=4, alpha=8, target_modules=ATTENTION_MODULES)
    archive = _archive(dict(adapter.config), dict(adapter.tensors))
    unpacked = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    with pytest.raises(AdapterError, match="exceed .* bytes unpacked"):
        import_adapter(archive, load_config(llama_path), "llama", max_bytes=unpacked // 2)
    assert import_adapter(archive, load_config(llama_path), "llama", max_bytes=2 * unpacked).digest == adapter.digest


def test_import_refuses_broken_archives(llama_path):
    base = load_config(llama_path)
    with pytest.raises(AdapterError, match="not a tar or zip"):
        import_adapter(b"garbage" * 10, base)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(CONFIG_FILE)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        import_adapter(buffer.getvalue(), base)
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr(CONFIG_FILE, "{}")
        z.writestr(WEIGHTS_FILE, b"not safetensors")
    with pytest.raises(AdapterError, match="unreadable adapter files"):
        import_adapter(broken.getvalue(), base)
