"""A contiguous span of a model's decoder layers, run exactly as the whole model would run them."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from blocks import batching, family, lora, packed_linears, slots
from blocks.cache import StaticKV
from blocks.graphs import FusedDecode, GpuState, fused_decode_supported, switched_on
from blocks.slots import ChunkRows, SlotPool, SlotRows
from blocks.checkpoint import load_config
from blocks.quant import check_quant, quantize_linears, weight_bytes


SHORT_STEP_TOKENS = 256  # steps of 2..this many tokens replay a captured graph (`BlockSpan._short_step`)
SHORT_STEP_FLOOR = 16  # the narrowest such graph: fewer tokens are padded to it


class BlockSpan:
    """Decoder layers [start, end) of a checkpoint, holding only their own weights.

    Layers keep their global indices: a cache is indexed by them and a layer's attention kind
    (full or sliding) depends on them.

    On a GPU, sessions get a static KV cache (`blocks.cache.StaticKV`) and a one-token step
    replays a CUDA graph captured for that session (per capacity of its cache, so per batch
    size and length bucket), which removes Python's per-kernel launch cost; prefill, multi-token
    steps and quantized spans run eagerly on the same static cache. With `enable_slots`, static
    caches are rows of a shared pool and sessions' one-token steps run batched (blocks/slots.py),
    one graph per bucket of rows, and their steps of a few tokens (a short prompt, a cached
    prompt's tail, drafts) replay a graph per bucket of widths. On a CPU nothing changes:
    transformers' DynamicCache, eager.
    """

    def __init__(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant: str = "none",
    ):
        check_quant(quant, device)
        config = load_config(model_path)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} layers")
        model = family.skeleton(config)
        self.config = model.config
        self.family = family.of(self.config)
        self.start, self.end = start, end
        self.num_layers = end - start
        self.hidden_size: int = config.hidden_size
        self.dtype = dtype
        self.device = torch.device(device)

        self.layers = nn.ModuleList(self.family.decoder_layers(model)[start:end])
        keys = {start + i: list(layer.state_dict()) for i, layer in enumerate(self.layers)}
        # Quantized weights are read to the CPU: bitsandbytes quantizes them on their way to the GPU.
        tensors = family.read_layers(model_path, self.family, keys, dtype, self.device if quant == "none" else "cpu")
        self.layers.load_state_dict(
            {f"{index - start}.{key}": tensor for (index, key), tensor in tensors.items()}, strict=True, assign=True
        )
        del tensors  # the layers hold them now; FusedDecode below replaces some (a copy while these lived)
        _materialize_buffers(self.layers, self.device)
        if quant != "none":
            quantize_linears(self.layers, quant, dtype)
            self.layers.to(self.device)
        self.layers.eval()
        self.layers.requires_grad_(False)  # frozen: only LoRA weights supplied per request are trained
        self.lora_targets = lora.attach(self.layers, start, self.family)  # module prefix -> module, per-request LoRA
        self.quant = quant
        # announced: weight memory per block (all experts; not the packed copies below)
        self.block_bytes = weight_bytes(self.layers) // self.num_layers
        # Rotary buffers are computed at init, so the meta skeleton's cannot be loaded: build anew.
        self.rotary_emb = None
        if self.family.rotary is not None:
            with self.device:
                self.rotary_emb = type(model.get_submodule(self.family.rotary))(config=self.config)

        self.layer_types = family.layer_types(self.config)[start:end]
        if batching.packs_weights(self.config, self.device, dtype, quant):
            packed_linears.pack(self.layers)  # for batched decode steps on a CPU (blocks/packed_linears.py)
        self._mask_layer = _mask_layers(start, self.layer_types)
        # ALiBi families keep DynamicCache and eager compute on a GPU too (family.static_cache).
        self.static_cache = self.device.type == "cuda" and self.family.static_cache
        self.use_graphs = (  # bitsandbytes: eager
            self.static_cache and quant == "none" and switched_on("SWARMGATE_CUDA_GRAPHS")
            and self.family.use_graphs(self.config)
        )
        self.fused = (FusedDecode(self.layers, start) if self.use_graphs and switched_on("SWARMGATE_FUSED_DECODE")
                      and fused_decode_supported(self.layers, self.config.model_type) else None)
        self._gpu = GpuState()
        self.slot_pools: list[SlotPool] = []  # shortest rows first; shared by views: they index them by global layer
        # one row, shared by views: short steps of sessions with buffers of their own
        self.staging: SlotPool | None = None

    def enable_slots(self, rows: int, length: int, staged: int = 0, longer: tuple[int, int] = (0, 0)) -> None:
        """On the static-cache path, give sessions rows of a pool of `rows` x `length` positions,
        and of `longer` (rows, length) for those that outgrow them (allocated at a first session),
        so their one-token steps batch (blocks/slots.py); and a staging row of `staged` positions,
        through which one-row sessions with buffers of their own take short steps (`_short_step`)."""
        if self.static_cache and rows > 0 and length > 0:
            self.slot_pools = [self._rows_of_kv(*shape) for shape in ((rows, length), longer) if shape[0] > 0]
            self.staging = self._rows_of_kv(1, staged) if staged > 0 else None

    @property
    def slot_pool(self) -> SlotPool | None:  # the shortest rows, where sessions start
        return self.slot_pools[0] if self.slot_pools else None

    def _rows_of_kv(self, rows: int, length: int) -> SlotPool:
        return SlotPool(start=self.start, num_layers=self.num_layers, kv_heads=self.family.kv_heads(self.config),
                        head_dim=self.family.head_dim(self.config), rows=rows, length=length, dtype=self.dtype,
                        device=self.device)

    def view(self, start: int, end: int) -> "BlockSpan":
        """Layers [start, end) of this span, sharing its weights: a server computes any part of
        its span, so spans that overlap without meeting at a boundary still chain."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not within this span [{self.start}, {self.end})")
        if (start, end) == (self.start, self.end):
            return self
        part = copy.copy(self)
        local = slice(start - self.start, end - self.start)
        part.start, part.end, part.num_layers = start, end, end - start
        part.layers = nn.ModuleList(self.layers[local])
        part.layer_types = self.layer_types[local]
        part._mask_layer = _mask_layers(start, part.layer_types)
        part.fused = self.fused.part(local, start) if self.fused is not None else None
        return part

    def new_cache(self) -> Cache | StaticKV:
        """A fresh per-session KV cache; indexed by global layer, only this span's layers fill.

        On a GPU a static one, allocated at the first step (sized by `reserve` when the server's
        SessionCaches opens the session, else grown as needed)."""
        if not self.static_cache:
            return DynamicCache(config=self.config)
        return StaticKV(start=self.start, num_layers=self.num_layers, kv_heads=self.family.kv_heads(self.config),
                        head_dim=self.family.head_dim(self.config), dtype=self.dtype, device=self.device,
                        pools=self.slot_pools)

    def forward(self, hidden: torch.Tensor, *, cache: Cache | None = None, position: int = 0,
                adapter: lora.SpanLora | None = None) -> torch.Tensor:
        """Hidden states [b, t, h] of tokens at positions [position, position + t) through the span.

        Without a cache it is a cache-less pass over a whole sequence (position 0); with one,
        `position` must equal the tokens the cache already holds, and the new ones are appended.
        `adapter` applies LoRA for this call only. `hidden` may be on the host: it is moved here.
        """
        if isinstance(cache, StaticKV):
            with torch.inference_mode(), lora.applied(adapter), self._gpu.lock:
                return self._forward_static(hidden, cache, position, adapter)
        with torch.inference_mode(), lora.applied(adapter), self._gpu.lock:
            return self._forward(hidden.to(self.device), cache, position)

    def batches(self, cache: object) -> bool:
        """Whether one-token steps on `cache` can run together with other sessions' (`forward_batch`):
        a DynamicCache of a span that batches (blocks/batching.py), or a static cache in pool rows
        with room in them for the step (blocks/slots.py)."""
        if isinstance(cache, StaticKV):
            return cache.pooled and cache.length < cache.pool.length and self.family.static_rope(self.config)
        return batching.batchable(self, cache)

    def caches_prefixes(self, cache: object) -> bool:
        """Whether a prompt on `cache` can go through the prefix cache (blocks/prefix_cache.py):
        a static cache holds every position; a DynamicCache must hold them all too (full attention)."""
        return isinstance(cache, StaticKV) or batching.batchable(self, cache)

    def forward_batch(
        self, steps: list[tuple[torch.Tensor, Cache, int]], adapter: lora.SpanLora | None = None
    ) -> list[torch.Tensor]:
        """One-token steps `(hidden, cache, position)` of several sessions sharing `adapter`, in
        one pass; each output as `forward` would give it, up to the float rounding of a batched
        matmul (on a CPU oneDNN's packed weights from 4 rows: blocks/packed_linears.py)."""
        with torch.inference_mode(), lora.applied(adapter), self._gpu.lock:
            if isinstance(steps[0][1], StaticKV):
                return self._forward_slots(steps, adapter)
            return batching.decode_together(self, [(hidden.to(self.device), cache, position)
                                                   for hidden, cache, position in steps])

    def backward(
        self, hidden: torch.Tensor, grad_output: torch.Tensor, adapter: lora.SpanLora | None, *,
        input_grad: bool = True,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Gradients of a cache-less forward with `adapter`, given the gradient of its output.

        Returns the gradient for `hidden` (None without `input_grad`) and for each LoRA tensor
        (PEFT names). The forward is recomputed here: no activations wait between a client's forward
        and backward requests.
        """
        if grad_output.shape != hidden.shape:
            raise ValueError(f"output gradient {list(grad_output.shape)} does not match the input {list(hidden.shape)}")
        trainable = adapter.trainable() if adapter is not None else None
        leaves = dict(trainable.named_tensors()) if trainable is not None else {}
        if not input_grad and not leaves:
            return None, {}
        # a copy: a plain tensor (a leaf when its gradient is asked for), even from inference mode
        hidden = hidden.detach().to(self.device, copy=True).requires_grad_(input_grad)
        with torch.enable_grad(), lora.applied(trainable), self._gpu.lock:
            output = self._forward(hidden, None, 0)
        wanted = [hidden, *leaves.values()] if input_grad else list(leaves.values())
        grads = torch.autograd.grad(output, wanted, grad_output.to(output.device, output.dtype))
        grad_input, grads = (grads[0], grads[1:]) if input_grad else (None, grads)
        return grad_input, dict(zip(leaves, grads))

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size or hidden.dtype != self.dtype:
            raise ValueError(
                f"expected {self.dtype} hidden states [batch, tokens, {self.hidden_size}], "
                f"got {hidden.dtype} {list(hidden.shape)}"
            )

    # -- the static-cache path (GPU) -------------------------------------------------------------
    def _forward_static(
        self, hidden: torch.Tensor, cache: StaticKV, position: int, adapter: lora.SpanLora | None
    ) -> torch.Tensor:
        self._check_hidden(hidden)
        if position != cache.length:
            raise ValueError(f"position {position} does not follow the {cache.length} tokens already seen")
        batch, tokens = hidden.shape[:2]
        if tokens == 0:
            return hidden.clone()
        cache.ensure(batch, position + tokens)  # may move it to longer pool rows
        if tokens == 1 and self.use_graphs and self.batches(cache):
            # alone in pool rows: the pool's graph of its bucket, as when batched (a graph per rows
            # a session sits in cost a capture of tens of ms for each, evicting the buckets')
            return self._forward_slots([(hidden, cache, position)], adapter)[0]
        hidden = hidden.to(self.device)
        if tokens == 1 and self.use_graphs:
            output = self._graph_step(hidden, cache, position, adapter)
        elif (self.use_graphs and tokens <= SHORT_STEP_TOKENS
              and (cache.pooled or self._stages(cache, position + tokens))):
            output = self._short_step(hidden, cache, position, adapter)
        else:
            output = self._eager_static(hidden, cache, position)
        cache.length = position + tokens
        return output

    def _eager_static(self, hidden: torch.Tensor, cache: StaticKV, position: int) -> torch.Tensor:
        """Any number of tokens, eagerly; attention over exactly the positions held (as HF's)."""
        tokens = hidden.shape[1]
        length = position + tokens
        cache.write_index, cache.write_at, cache.view_length = None, position, length
        position_ids = torch.arange(position, length, device=hidden.device).unsqueeze(0)
        masks = {kind: self._static_mask(kind, position, tokens) for kind in self._mask_layer}
        position_embeddings = self.family.position_embeddings(self.rotary_emb, hidden, position_ids, list(masks))
        return self._run_layers(hidden, cache, masks, position_embeddings, position_ids)

    def _run_layers(self, hidden, cache, masks, position_embeddings, position_ids) -> torch.Tensor:
        if self.fused is not None and hidden.shape[1] == 1 and not lora.active():  # one token, no adapter
            return self.fused.run(hidden, cache, masks, position_embeddings, self.layer_types)
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings[kind],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
        return hidden

    def _window(self, kind: str) -> int | None:
        return getattr(self.config, "sliding_window", None) if kind == "sliding_attention" else None

    def _static_mask(self, kind: str, position: int, tokens: int) -> torch.Tensor | None:
        """Boolean [1, 1, tokens, position + tokens] (True attends), or None where SDPA needs none:
        one query sees every held key, or a first chunk is plainly causal."""
        length, window = position + tokens, self._window(kind)
        if (tokens == 1 or position == 0) and (window is None or length <= window):
            return None
        query = torch.arange(position, length, device=self.device)[:, None]
        key = torch.arange(length, device=self.device)[None, :]
        mask = key <= query
        if window is not None:
            mask &= key > query - window
        return mask[None, None]

    def _graph_step(
        self, hidden: torch.Tensor, cache: StaticKV, position: int, adapter: lora.SpanLora | None
    ) -> torch.Tensor:
        """One token through a CUDA graph over this session's buffers (captured at its first such
        step). A session in pool rows whose steps cannot batch (`batches`; those that can go
        through the pool's bucket graphs) keeps its graph in the pool: a graph reads the rows'
        addresses, not the session, so the next session in the same rows replays it rather than
        capturing anew (a capture costs tens of ms)."""
        key = (cache.capacity, id(adapter))
        if cache.pooled:
            key = ("rows", self.start, self.end, cache.row, cache.batch, *key)
        graphs = cache.pool.graphs if cache.pooled else cache.graphs
        if (step := graphs.get(key)) is not None:
            return step.replay(hidden, position)
        gpu = self._gpu
        if gpu.positions is None or len(gpu.positions) < cache.capacity:
            if gpu.positions is not None:
                gpu.retired.append(gpu.positions)  # captured graphs still read it
            gpu.positions = torch.arange(max(cache.capacity, self.config.max_position_embeddings), device=self.device)
        inputs = (hidden.clone(), torch.full((1,), position, dtype=torch.long, device=self.device))
        result, step = gpu.capture(self.device, inputs, lambda h, p: self._graph_body(h, p, cache), adapter,
                                   cache.pool.graph_memory if cache.pooled else None)
        graphs.keep(key, step)
        return result

    def _graph_body(self, hidden: torch.Tensor, position: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        """The one-token step with its position as a device tensor; attention over the whole
        capacity, masked past the position (kept static so a graph replays it)."""
        length = cache.capacity
        cache.write_index, cache.view_length = position, length
        try:
            masks = {kind: mask.view(1, 1, 1, length)
                     for kind, mask in self._attended(self._gpu.positions[:length], position).items()}
            position_ids = position.view(1, 1)
            position_embeddings = self.family.position_embeddings(self.rotary_emb, hidden, position_ids, list(masks))
            return self._run_layers(hidden, cache, masks, position_embeddings, position_ids)
        finally:
            cache.write_index = None

    def _attended(self, keys: torch.Tensor, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per attention kind, [queries, keys] booleans: which of the positions `keys` each of the
        positions `queries` attends (causally; within the window, for a sliding kind)."""
        masks = {}
        for kind in self._mask_layer:
            mask = keys[None, :] <= queries[:, None]
            if (window := self._window(kind)) is not None:
                mask = mask & (keys[None, :] > queries[:, None] - window)
            masks[kind] = mask
        return masks

    def _stages(self, cache: StaticKV, needed: int) -> bool:
        """Whether a short step of `cache` (buffers of its own) can go through the staging row."""
        return self.staging is not None and cache.batch == 1 and needed <= self.staging.length

    def _short_step(self, hidden: torch.Tensor, cache: StaticKV, position: int,
                    adapter: lora.SpanLora | None) -> torch.Tensor:
        """A few tokens (a short prompt, a cached prompt's uncached tail, drafts) through a graph
        per (rows, width, attended length, adapter) bucket: eager, such a step is mostly Python
        launching kernels, as a one-token step is. The session's rows, its first position and
        where each token writes are inputs, so a graph serves sessions in any pool rows; tokens
        padding the width write to the scratch position and their outputs are dropped. A bucket
        runs eagerly the first time and is captured when it comes again. A session with buffers
        of its own goes through the span's staging row: the positions it holds copied in, the
        new ones copied back (two copies per layer each way, against tens of ms of eager Python
        for 16 layers of 8B shapes)."""
        pool = cache.pool if cache.pooled else self.staging
        assert pool is not None and (cache.pool is pool or not cache.pooled)
        batch, tokens = hidden.shape[:2]
        if not cache.pooled:
            if not pool.keys:
                pool.take(1)  # its one row, for good
            self._stage(cache, pool, slice(0, position), into_pool=True)
        width = slots.bucket(tokens, SHORT_STEP_TOKENS, floor=SHORT_STEP_FLOOR)
        length = slots.bucket(position + tokens, pool.length, floor=slots.MIN_LENGTH)
        staged = hidden.new_zeros(batch, width, self.hidden_size)
        staged[:, :tokens] = hidden
        where = torch.full((width,), pool.scratch, dtype=torch.long)
        where[:tokens] = torch.arange(position, position + tokens)
        first_row = cache.row if cache.pooled else 0
        values = (staged, torch.tensor([position]), where, torch.arange(first_row, first_row + batch))
        key = (self.start, self.end, batch, width, length, id(adapter))
        if (step := pool.short_graphs.get(key)) is not None:
            output = step.replay(*values)
        else:
            inputs = tuple(value.to(self.device) for value in values)
            body = functools.partial(self._short_body, pool=pool, length=length)
            if pool.short_graphs.first_use(key):  # eager once: only buckets that come again are captured
                output = body(*inputs)
            else:
                output, step = self._gpu.capture(self.device, inputs, body, adapter, pool.graph_memory)
                pool.short_graphs.keep(key, step)
        if not cache.pooled:
            self._stage(cache, pool, slice(position, position + tokens), into_pool=False)
        return output[:, :tokens]

    def _stage(self, cache: StaticKV, pool: SlotPool, positions: slice, *, into_pool: bool) -> None:
        """Copy `positions` of the session's own keys and values into the staging row, or back."""
        for layer in range(self.start, self.end):
            for own, staged in ((cache.keys, pool.keys), (cache.values, pool.values)):
                ours, theirs = own[layer - cache.start][:, :, positions], staged[layer - pool.start][:, :, positions]
                if into_pool:
                    theirs.copy_(ours)
                else:
                    ours.copy_(theirs)

    def _short_body(self, hidden: torch.Tensor, first: torch.Tensor, where: torch.Tensor, rows: torch.Tensor, *,
                    pool: SlotPool, length: int) -> torch.Tensor:
        """`hidden`'s tokens at positions `first`, `first` + 1, ... of `pool`'s rows `rows`,
        attending causally to the first `length` positions."""
        # a padding query past a sliding window's reach may see no key: its row is NaN, dropped
        queries = first + torch.arange(hidden.shape[1], device=self.device)
        masks = {kind: mask.view(1, 1, hidden.shape[1], length)
                 for kind, mask in self._attended(torch.arange(length, device=self.device), queries).items()}
        position_ids = queries.view(1, -1)
        position_embeddings = self.family.position_embeddings(self.rotary_emb, hidden, position_ids, list(masks))
        return self._run_layers(hidden, ChunkRows(pool, rows, where, length), masks, position_embeddings, position_ids)

    # -- batched steps over pool rows (blocks/slots.py) ------------------------------------------
    def _forward_slots(self, steps, adapter: lora.SpanLora | None) -> list[torch.Tensor]:
        """One-token steps of sessions in pool rows as one forward over the pool's first rows:
        a CUDA graph per (rows, attended length, adapter) bucket where graphs apply, else eager."""
        pool = steps[0][1].pool
        placed = []  # (first row, rows) of each step, read once: a session may close meanwhile
        for hidden, cache, position in steps:
            self._check_hidden(hidden)
            if hidden.shape[1] != 1 or not cache.pooled or cache.pool is not pool or position >= pool.length:
                raise ValueError("batched steps are one token each, of sessions with room in rows of one pool")
            if position != cache.length:
                raise ValueError(f"position {position} does not follow the {cache.length} tokens already seen")
            cache.ensure(hidden.shape[0], position + 1)
            placed.append(slice(cache.row, cache.row + hidden.shape[0]))
        rows = slots.bucket(max(where.stop for where in placed), pool.rows)
        length = slots.bucket(max(position for _, _, position in steps) + 1, pool.length, floor=slots.MIN_LENGTH)
        staged_hidden = torch.zeros(rows, 1, self.hidden_size, dtype=self.dtype)
        staged_positions = torch.full((rows,), pool.scratch, dtype=torch.long)
        for (hidden, _, position), where in zip(steps, placed):
            staged_hidden[where] = hidden
            staged_positions[where] = position
        if self.use_graphs:
            output = self._slots_graph(pool, rows, length, adapter, staged_hidden, staged_positions)
        else:
            output = self._slots_body(staged_hidden.to(self.device), staged_positions.to(self.device), pool, rows, length)
        if steps[0][0].device.type == "cpu":
            output = output.cpu()  # one copy back for the whole batch
        for _, cache, position in steps:
            cache.length = position + 1
        return [output[where] for where in placed]

    def capture_decode_steps(self) -> int:
        """Capture each pool's one-token step of every (rows, length) bucket now, as vLLM captures
        its batch sizes at start: a capture while serving holds this process's GPU work for tens
        of ms, and every session in the chain waits. Without an adapter (each has its own graphs,
        captured at first use); at most what a pool's LRU keeps. Returns the graphs captured."""
        if not self.use_graphs or not self.family.static_rope(self.config):
            return 0
        captured = 0
        with torch.inference_mode(), lora.applied(None), self._gpu.lock:
            for pool in self.slot_pools:
                pool.allocate()
                buckets = pool.decode_buckets()[: pool.graphs.max_graphs]
                # Largest first, as vLLM: the smaller steps' intermediates fit in what it took from the
                # pool's shared memory. Every row at the scratch position: no session's cache is touched.
                for rows, length in reversed(buckets):
                    hidden, scratch = torch.zeros(rows, 1, self.hidden_size, dtype=self.dtype), pool.scratch
                    self._slots_graph(pool, rows, length, None, hidden, torch.full((rows,), scratch, dtype=torch.long))
                captured += len(buckets)
        return captured

    def _slots_graph(self, pool: SlotPool, rows: int, length: int, adapter, hidden: torch.Tensor, positions: torch.Tensor):
        key = (self.start, self.end, rows, length, id(adapter))
        if (step := pool.graphs.get(key)) is not None:
            return step.replay(hidden, positions)
        inputs = (hidden.to(self.device), positions.to(self.device))
        body = functools.partial(self._slots_body, pool=pool, rows=rows, length=length)
        result, step = self._gpu.capture(self.device, inputs, body, adapter, pool.graph_memory)
        pool.graphs.keep(key, step)
        return result

    def _slots_body(self, hidden: torch.Tensor, positions: torch.Tensor, pool: SlotPool, rows: int, length: int):
        """Rows [0, rows) of the pool, row r at `positions[r]` (scratch for rows not stepping)."""
        masks = {kind: mask.view(rows, 1, 1, length)
                 for kind, mask in self._attended(torch.arange(length, device=self.device), positions).items()}
        position_ids = positions.view(rows, 1)
        position_embeddings = self.family.position_embeddings(self.rotary_emb, hidden, position_ids, list(masks))
        return self._run_layers(hidden, SlotRows(pool, rows, length, positions), masks,
                                position_embeddings, position_ids)

    # -- the dynamic-cache path (CPU, and cache-less passes) -------------------------------------
    def _forward(self, hidden: torch.Tensor, cache: Cache | None, position: int) -> torch.Tensor:
        """The computation itself, under whatever grad mode the caller chose."""
        self._check_hidden(hidden)
        seen = cache.get_seq_length(self.start) if cache is not None else 0
        if position != seen:
            raise ValueError(f"position {position} does not follow the {seen} tokens already seen")
        position_ids = torch.arange(position, position + hidden.shape[1], device=hidden.device).unsqueeze(0)
        inputs = self.family.layer_inputs(self, hidden, cache, position_ids)
        for layer, kind in zip(self.layers, self.layer_types):
            output = layer(hidden, **inputs[kind])
            hidden = output[0] if isinstance(output, tuple) else output  # BLOOM/Falcon: (hidden, attentions)
        return hidden


def _materialize_buffers(layers: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers left on the meta device by the skeleton (none in today's families)."""
    for name, buffer in layers.named_buffers():
        if buffer.is_meta:
            raise ValueError(f"{name}: a buffer computed at init that spans cannot rebuild")


def _mask_layers(start: int, layer_types: list[str]) -> dict[str, int]:
    """Masks are sized from the cache, so each kind is sized by one of *our* layers of that kind."""
    return {kind: start + layer_types.index(kind) for kind in dict.fromkeys(layer_types)}
