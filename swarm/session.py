"""An inference session over a chain of servers that survives servers dying mid-request.

The chain is a list of hops, each a session on one server for one span. A step goes to the first
hop with the rest of the chain as its route; every server pushes its output to the next hop and
also sends it back here, so the session holds each hop's inputs, as the exact wire bytes, step
by step (DESIGN.md §7) — but for a prompt's start that a server named by its cached blocks' keys:
a hop whose inputs were named is replayed from an earlier hop, the first at worst.

When a hop fails — its stream ends or resets, it answers with an error, or nothing arrives for
``step_timeout`` — its blocks get a replacement chain (from any live servers holding them, which
compute just those blocks of their spans), the new hops are replayed the recorded inputs (same
bytes and deterministic compute give the same caches), and the step resumes at the new hops. Whether the
dead server forwarded the step before dying is unknowable, so the step is simply sent on again:
servers drop a step at a position they already hold, and every output names the session it was
pushed to, so the client sends a step itself to any next hop that did not get it. Each hop
answers each step exactly once, whatever failed where. A server that failed is not proposed again
within the step; one that only timed out is, once no other can take its blocks (under load, a
slow server is not a dead one).

A step may ask for only its last ``tail`` positions (a generation samples from the last one): the
last hop then returns just those. Its outputs are no hop's inputs, so replay loses nothing; with
spot checks on, every position comes back, since a check compares them all.

``truncate`` forgets the last positions (speculative decoding's rejected drafts): the records are
cut there, so a replay rebuilds only what is kept, and later steps carry the truncation count; a
count new to a server rolls its session back to the step's position (the same count: a duplicate).

A session sees its client only through ``ChainProvider`` (chains, load, backoff, opening hops)
and a ``SessionConfig``; a ``SessionRequest`` says what the session asks of every server
(swarm/hops.py). A one-row prompt may name its start by keys instead of sending it
(swarm/prompt_names.py); a one-token step may go with other sessions' in one frame per hop
(swarm/step_groups.py), its answers and failures coming to the same loop as its own.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Sequence

import torch
import trio

from blocks.prefix_cache import BLOCK
from swarm import codec, prompt_names, protocol
from swarm.hops import ChainProvider, Hop, RetriesExhausted, SessionConfig, SessionRequest
from swarm.prompt_names import PrefixMemory
from swarm.records import ServerRecord
from swarm.routing import NoChainError
from swarm.step_groups import GroupRow, StepAlone, StepGroups
from swarm.trust.checks import SpotChecks

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.5  # seconds between looks at the records while waiting for a replacement server


class InferenceSession:
    """A stateful generation session: ``step`` hidden states through every block, in order."""

    def __init__(self, chains: ChainProvider, request: SessionRequest, config: SessionConfig,
                 prefixes: PrefixMemory | None = None, groups: StepGroups | None = None) -> None:
        self._chains = chains
        self._prefixes = prefixes  # the client's: which prompt blocks servers hold (swarm/prompt_names.py)
        self._groups = groups  # the client's: one-token steps sent with other sessions' (swarm/step_groups.py)
        self._prompt: tuple[list[bytes], dict[str, Any]] | None = None  # this step's keys and first fields
        self._config = config
        self.request = request
        self._hops: list[Hop] = []
        self._offsets: list[int] = []  # position of each step
        self._tail: int | None = None  # positions the current step's last hop returns (None: all)
        self._failed: set[str] = set()  # peers that failed during the current step
        self._slow: set[str] = set()  # peers that timed out during it: maybe loaded, not dead
        self._moved: set[str] = set()  # peers whose records proved stale during it: not failed
        self._failures = 0
        self._last_error: BaseException = ConnectionError("no server answered")
        self._error: BaseException | None = None
        self._output: dict[str, Any] | None = None
        self._events: trio.MemorySendChannel | None = None
        self._nursery: trio.Nursery | None = None
        self._checks = SpotChecks(chains, request, fraction=config.verify_fraction, timeout=config.step_timeout,
                                  close_streams=self._close)
        self._max_elements = 0  # of a decoded step: batch x max_length x hidden size
        self._truncations = 0  # how many times `truncate` cut positions; every step frame carries it
        self.position = 0

    @property
    def chain(self) -> list[ServerRecord]:
        return [hop.record for hop in self._hops]

    async def open(self) -> None:
        """Open sessions along a chain over every block; a server that refuses or fails is replaced,
        waiting up to ``replace_wait`` for another when none is left (one restarting, say); but
        servers that are full answer at once (the caller may retry later or elsewhere)."""
        hops = await self._open_hops(lambda: self._find_unless_full(0, self.request.num_blocks),
                                     wait=self._config.replace_wait)
        if hops is None:
            raise self._last_error
        self._hops = hops

    # -- steps -----------------------------------------------------------------------------------
    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        """[batch, tokens, hidden] in, [batch, tail or tokens, hidden] out: the prompt, then the next
        token (and any drafts); `tail` asks for only the last positions' outputs."""
        if self._error is not None:
            raise RuntimeError(f"the session failed earlier: {self._error!r}")
        batch, max_length = self.request.batch, self.request.max_length
        if hidden.dim() != 3 or hidden.shape[0] != batch:
            raise ValueError(f"expected hidden states [{batch}, tokens, hidden], got {list(hidden.shape)}")
        if self.position + hidden.shape[1] > max_length:
            raise ValueError(f"session is limited to {max_length} tokens")
        if tail is not None and not 1 <= tail <= hidden.shape[1]:
            raise ValueError(f"tail {tail} outside [1, {hidden.shape[1]}]")
        cut = tail is not None and tail < hidden.shape[1] and not self._config.verify_fraction
        self._tail = tail if cut else None
        self._offsets.append(self.position)
        self._max_elements = batch * max_length * hidden.shape[2]
        record = codec.encode(hidden, self.request.wire_codec)
        self._hops[0].inputs.append(record)
        try:
            self._prompt = await self._name_prompt(hidden, record)
            output = await self._run_step(self._groupable(hidden))
        except BaseException as error:
            self._error = error  # the chain's state is unknown now: no further steps
            raise
        self.position += hidden.shape[1]
        result = codec.decode(output, max_elements=self._max_elements)
        if (expected := [hidden.shape[0], self._tail or hidden.shape[1], hidden.shape[2]]) != list(result.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, expected {expected}")
        return result.to(hidden.dtype)

    async def _name_prompt(self, hidden: torch.Tensor, record: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]] | None:
        """A one-row prompt's keys, and its first send's fields naming the blocks that the first
        server holds as far as this client knows; None where prompts are sent whole (with spot
        checks every output comes back; without pushes this client would relay named outputs)."""
        config = self._config
        if self._prefixes is None or self.position or hidden.shape[0] != 1 or hidden.shape[1] <= BLOCK \
                or config.verify_fraction or not config.push or not self._hops[0].names:
            return None
        keys = await prompt_names.prompt_keys(record, hidden.shape[1])
        return keys, prompt_names.named_fields(hidden, record, keys, self._prefixes.held(self._place(0), keys))

    def _groupable(self, hidden: torch.Tensor) -> bool:
        """A pushed one-token step, not spot-checked (a check needs each hop's answer), of joinable bytes."""
        return (self._groups is not None and self._groups.running and hidden.shape[1] == 1 and self._prompt is None
                and self._config.push and not self._config.verify_fraction and self._groups.takes(self._hops)
                and codec.rows_apart(self.request.wire_codec, hidden.shape[0] * hidden.shape[2]))

    def _place(self, index: int) -> tuple[Any, ...]:
        """What a prefix cache's namespace is to this session's hop `index`: its span, adapter, codec and salt."""
        record, adapter = self._hops[index].record, self.request.adapter
        return (record.peer_id, record.start, record.end, adapter and adapter.digest, self.request.wire_codec,
                self.request.cache_salt)

    async def truncate(self, position: int) -> None:
        """Forget positions [position, self.position), between steps, with no round trip (see above);
        shadows that computed a forgotten position are closed: the next check rebuilds them."""
        if self._error is not None:
            raise RuntimeError(f"the session failed earlier: {self._error!r}")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot truncate to {position}: the session holds {self.position} tokens")
        if position == self.position:
            return
        keep = sum(1 for offset in self._offsets if offset < position)  # steps with a kept token
        cut = keep > 0 and (self._offsets[keep:] + [self.position])[0] > position  # inside step keep - 1
        for hop in self._hops:
            del hop.inputs[keep:], hop.outputs[keep:]
            for records in (hop.inputs, hop.outputs) if cut else ():
                if len(records) == keep:  # the cut step's first tokens, as exact bytes
                    records[-1] = prompt_names.cut(records[-1], position - self._offsets[keep - 1], self._max_elements)
            hop.done = min(hop.done, keep)
        del self._offsets[keep:]
        self.position, self._truncations = position, self._truncations + 1
        await self._checks.truncated(keep, cut)

    async def _run_step(self, grouped: bool = False) -> dict[str, Any]:
        """Drive the current step to the end of the chain, replacing hops that fail on the way."""
        self._failed, self._slow, self._moved, self._failures, self._output = set(), set(), set(), 0, None
        self._events, events = trio.open_memory_channel[tuple[Hop, Any]](math.inf)
        failure: Exception | None = None
        grouped_hops = list(self._hops) if grouped and self._groups is not None else []
        for hop in self._hops:
            hop.reader = None  # the last step's readers are done; a group's answers come without one
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._drive(events, grouped)
                    for hop in self._hops:  # a hop answered in a group after it was sent the step itself
                        if hop.reader is not None:
                            hop.reader.cancel()
                except Exception as error:  # raised below as itself, not inside an exception group
                    failure = error
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = self._events = None
            if grouped_hops and self._groups is not None:
                self._groups.forget(grouped_hops)
        if failure is not None:
            raise failure
        assert self._output is not None
        for hop in self._hops:
            self._chains.succeeded(hop.record.peer_id)
        return self._output

    async def _drive(self, events: trio.MemoryReceiveChannel, grouped: bool) -> None:
        assert self._events is not None
        send = self._events.send_nowait  # in a group, every hop answers in its frames or fails there
        if not (grouped and self._groups is not None and self._groups.submit(GroupRow(
                list(self._hops), self._offsets[-1], self._truncations, self._hops[0].inputs[-1],
                lambda hop, event: send((hop, event))))):
            await self._send_alone()
        await self._collect(events)
        while await self._verify():
            await self._collect(events)  # the chain was rebuilt after a liar: drive the step again

    async def _send_alone(self) -> None:
        """The current step sent along the chain on this session's own streams (not in a group)."""
        for hop in self._hops:
            if hop.reader is None:
                self._start_reader(hop)
        await self._send(self._hops[0], len(self._offsets) - 1, route=self._hops[1:] if self._config.push else (),
                         fields=self._prompt and self._prompt[1])

    async def _collect(self, events: trio.MemoryReceiveChannel) -> None:
        """Until every hop answered the current step, replacing those that fail."""
        steps = len(self._offsets)
        while (behind := next((h for h in self._hops if h.done < steps), None)) is not None:
            with trio.move_on_after(self._config.step_timeout) as idle:
                batch = [await events.receive()]
            if idle.cancelled_caught:
                batch = [(behind, TimeoutError(f"no answer for {self._config.step_timeout:.0f} s"))]
            while True:  # all that is known already, so every failure counts before any replacement
                try:
                    batch.append(events.receive_nowait())
                except trio.WouldBlock:
                    break
            failed: dict[Hop, BaseException] = {}
            for hop, event in batch:
                if hop not in self._hops or hop in failed:
                    continue  # from a hop replaced since, or failed already
                if isinstance(event, StepAlone):
                    await self._send_alone()
                    continue
                try:
                    if isinstance(event, Exception):
                        raise event
                    await self._accept(hop, protocol.expect(event, "output"))
                except Exception as error:  # EOF, reset, timeout, error reply, bad frame: the hop failed
                    failed[hop] = error
            for hop, error in failed.items():
                if isinstance(error, protocol.RemoteError) and error.code == protocol.UNKNOWN_PREFIX and self._named(hop):
                    self._forget_named(hop)  # a prefix evicted is no server's failure: replayed with bytes
                else:
                    self._note_failure(hop.record.peer_id, error)
            for hop, error in failed.items():
                await self._replace(hop, error)

    def _named(self, hop: Hop) -> bool:
        """Whether this step named prompt blocks to `hop` (so an ``unknown_prefix`` from it is no failure)."""
        first = hop is self._hops[0] and self._prompt is not None and bool(self._prompt[1]["prefix"])
        return first or any(map(prompt_names.is_named, hop.inputs))

    def _forget_named(self, hop: Hop) -> None:
        if hop is self._hops[0] and self._prompt is not None and self._prefixes is not None:
            self._prefixes.forget(self._place(0), self._prompt[0])

    def _start_reader(self, hop: Hop) -> None:
        assert self._nursery is not None
        hop.reader = trio.CancelScope()
        self._nursery.start_soon(self._read, hop, len(self._offsets) - hop.done, hop.reader)

    async def _read(self, hop: Hop, count: int, scope: trio.CancelScope) -> None:
        """Pass the hop's next `count` frames (or its failure) to the step's loop."""
        assert self._events is not None
        with scope:
            try:
                for _ in range(count):
                    frame = await protocol.read_frame(hop.stream, max_bytes=protocol.MAX_REPLY_FRAME)
                    self._events.send_nowait((hop, frame))
            except Exception as error:  # EOF, stream reset, bad frame: the hop failed
                self._events.send_nowait((hop, error))

    async def _accept(self, hop: Hop, frame: dict[str, Any]) -> None:
        """An output of `hop`: record it as the next hop's input, and send it there if no push did."""
        step = hop.done
        if protocol.field(frame, "position", int) != self._offsets[step]:
            raise protocol.ProtocolError(f"server {hop.record.peer_id} answered for another step")
        current = step == len(self._offsets) - 1
        # named outputs only where this step let servers name them; any other answer sends its bytes
        record = prompt_names.output_record(frame) if current and self._prompt else protocol.field(frame, "hidden", dict)
        hop.done += 1
        if len(hop.outputs) == step:
            hop.outputs.append(record)
        index = self._hops.index(hop)
        if index == 0 and self._prompt and step == len(self._offsets) - 1 and type(cached := frame.get("cached")) is int:
            assert self._prefixes is not None
            self._prefixes.remember(self._place(0), self._prompt[0][:cached])
        if index + 1 == len(self._hops):
            if step == len(self._offsets) - 1:
                self._output = protocol.field(frame, "hidden", dict)  # the chain's end names nothing
            return
        after = self._hops[index + 1]
        if len(after.inputs) == step:
            after.inputs.append(record)
        if after.done <= step and frame.get("pushed") != after.session:
            if after.reader is None:  # it was to answer in a group's frame: it answers on its stream now
                self._start_reader(after)
            await self._send(after, step)

    async def _send(self, hop: Hop, step: int, route: Sequence[Hop] = (), fields: dict[str, Any] | None = None) -> None:
        """Send step `step` to `hop`, to be pushed on along `route` (with `fields` instead of its record).
        Only a step's first send has a route: while recovering, this client relays each output
        itself, so no server spends its time dialling a peer that may have died too."""
        current = step == len(self._offsets) - 1
        tail = self._tail if current else None  # an earlier step's outputs are replayed in full
        frame = {"type": "step", "position": self._offsets[step], **(fields or prompt_names.step_fields(hop.inputs[step])),
                 "route": [after.route_entry(tail if after is self._hops[-1] else None) for after in route]}
        if tail is not None and hop is self._hops[-1]:
            frame["tail"] = tail
        if self._truncations:
            frame["truncations"] = self._truncations
        try:
            with protocol.time_limit(self._config.step_timeout):
                await protocol.write_frame(hop.stream, frame)
        except Exception as error:
            assert self._events is not None
            self._events.send_nowait((hop, error))  # the loop replaces the hop

    # -- recovery ----------------------------------------------------------------------------------
    def _note_failure(self, peer_id: str, error: BaseException) -> None:
        (self._slow if isinstance(error, (TimeoutError, trio.TooSlowError)) else self._failed).add(peer_id)
        avoided_for = self._chains.failed(peer_id)
        logger.warning("server %s failed (%r); avoiding it for %.0f s", peer_id, error, avoided_for)
        self._count_retry(error)

    def _note_moved(self, peer_id: str, error: BaseException) -> None:
        """A server serving other blocks than its record said: alive, no failure; its record is forgotten (a retry)."""
        self._moved.add(peer_id)
        self._chains.forget(peer_id)
        logger.info("server %s moved (%s); waiting for its new record", peer_id, error)
        self._count_retry(error)

    def _count_retry(self, error: BaseException) -> None:
        self._failures += 1
        self._last_error = error
        if self._failures > self._config.max_retries:
            raise RetriesExhausted(f"gave up after {self._failures} server failures; the last: {error!r}") from error

    async def _replace(self, hop: Hop, error: BaseException) -> None:
        """Swap a failed hop for a chain of new hops over its blocks, and replay its inputs there;
        where a server named some of them (this client lacks their bytes), the hops from the last
        one whose inputs it holds whole on are rebuilt (the first hop's it always holds)."""
        if hop not in self._hops:
            return  # rebuilt already, with a hop before it
        index = self._hops.index(hop)
        first = max(i for i in range(index + 1) if not any(map(prompt_names.is_named, self._hops[i].inputs)))
        await self._rebuild(self._hops[first:index + 1], error)
        self._chains.replayed()

    async def _rebuild(self, old: list[Hop], error: BaseException | None = None) -> None:
        """Replace consecutive hops `old` by a new chain over their blocks and replay the recorded inputs."""
        start, end = old[0].record.start, old[-1].record.end
        before = None if error is self._last_error else self._last_error  # an earlier step's BUSY is no reason now
        new = await self._open_hops(lambda: self._find_unless_full(start, end, before), wait=self._config.replace_wait)
        if new is None:
            raise NoChainError(self.request.model, list(range(start, end))) from error
        new[0].inputs = list(old[0].inputs)
        for hop in old:
            await self._drop(hop)
        index = self._hops.index(old[0])
        self._hops[index:index + len(old)] = new
        logger.info("replaying %d steps into blocks [%d, %d) on %s", len(new[0].inputs), start, end,
                    ", ".join(h.record.peer_id for h in new))
        for hop in new:
            self._start_reader(hop)
        for step in range(len(new[0].inputs)):
            await self._send(new[0], step)

    def _find_unless_full(self, start: int, end: int, before: BaseException | None = None) -> list[ServerRecord] | None:
        """`_find`; with no chain left after a server said it is full (since `before`), that at once."""
        chain, last = self._find(start, end), self._last_error
        if chain is None and last is not before and isinstance(last, protocol.RemoteError) and last.code == protocol.BUSY:
            raise last
        return chain

    def _find(self, start: int, end: int) -> list[ServerRecord] | None:
        """A chain avoiding this step's failed and slow peers; else a slow one again (not a crash); else None."""
        for avoid in (self._failed | self._slow, self._failed) if self._slow else (self._failed,):
            try:
                return self._chains.choose(self.request.model, start, end, avoid=avoid)
            except NoChainError:
                if not self._hops and not self._failed and not self._slow and not self._moved:
                    raise  # opening, and no server failed or moved: there is no chain at all
        return None  # a server may be (re)joining; or, opening, the failed ones' errors say why

    async def _open_hops(self, find: Callable[[], list[ServerRecord] | None], *, wait: float) -> list[Hop] | None:
        """Open the chain `find` proposes; on a refusal, note the failure and ask again.

        None when `find` has nothing to propose for `wait` seconds.
        """
        deadline = trio.current_time() + wait
        while True:
            chain = find()
            if chain is None:
                if trio.current_time() >= deadline:
                    return None
                await trio.sleep(POLL_INTERVAL)
                continue
            self._chains.reserve(chain)  # before any await, so concurrent sessions see this one's choice
            hops: list[Hop | None] = [None] * len(chain)
            errors: list[tuple[str, Exception]] = []
            try:
                await self._open_all(chain, hops, errors)
            except BaseException:  # cancelled
                await self._abandon(chain, hops)
                raise
            if not errors:
                return [hop for hop in hops if hop is not None]
            await self._abandon(chain, hops)
            for peer_id, error in errors:
                if isinstance(error, protocol.RemoteError) and error.code == protocol.MOVED:
                    self._note_moved(peer_id, error)
                else:
                    self._note_failure(peer_id, error)

    async def _abandon(self, chain: list[ServerRecord], hops: list[Hop | None]) -> None:
        """Give up a chain that did not open whole: release the servers not opened, close the others."""
        self._chains.release(*(record.peer_id for record, hop in zip(chain, hops) if hop is None))
        for hop in hops:
            if hop is not None:
                await self._drop(hop, clean=True)  # opened, and sent nothing since

    async def _open_all(self, chain: list[ServerRecord], hops: list[Hop | None],
                        errors: list[tuple[str, Exception]]) -> None:
        """Open every hop of `chain` at once (one round trip, not one per hop), filling `hops` and
        `errors` in; the first failure stops the others (only its server counts as failed). Each
        server is told the next one, so it opens its push stream while the client is still opening."""

        async def open_hop(index: int, record: ServerRecord) -> None:
            push_to = chain[index + 1] if self._config.push and index + 1 < len(chain) else None
            try:
                hops[index] = await self._chains.open_hop(record, self.request, push_to)
            except Exception as error:
                errors.append((record.peer_id, error))
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for index, record in enumerate(chain):
                nursery.start_soon(open_hop, index, record)

    async def _drop(self, hop: Hop, *, background: bool = True, clean: bool = False) -> None:
        """Stop reading a hop and end its session (and its shadow's), in the background during a step
        (a dead server must not hold up recovery); `clean`: all answered, its stream may be reused."""
        if hop.reader is not None:
            hop.reader.cancel()
        self._chains.release(hop.record.peer_id)
        await self._checks.drop(hop, background=background)
        if background and self._nursery is not None:
            self._nursery.start_soon(functools.partial(self._chains.end_hop, hop, clean=clean))
        else:
            await self._chains.end_hop(hop, clean=clean)

    async def _close(self, streams: list[protocol.Stream], *, background: bool = True) -> None:
        for stream in streams:
            if background and self._nursery is not None:
                self._nursery.start_soon(protocol.close_quietly, stream)
            else:
                await protocol.close_quietly(stream)

    # -- verification ------------------------------------------------------------------------------
    async def _verify(self) -> bool:
        """Spot-check this step's hops (swarm/trust/checks.py). True when a hop was caught lying:
        that hop and every later one (their caches hold what followed the lie) are rebuilt and
        replayed, so the step must be collected again."""
        liars = await self._checks.liars(self._hops, self._offsets, self._max_elements)
        if not liars:
            return False
        await self._rebuild(self._hops[min(self._hops.index(hop) for hop in liars):])
        self._output = None
        return True

    async def close(self) -> None:
        """Ending the hops' sessions frees every server's cache for this session. Ended here, not in
        a step's nursery: ``close`` may run while a cancelled step's nursery is still winding down (a
        client that disconnects mid-step), which takes no new tasks. After a failed or cancelled step
        the hops' streams are closed, not reused: a reply may still be on its way."""
        hops, self._hops = self._hops, []
        if hops and self._groups is not None:
            self._groups.leave(hops[0].session)
        for hop in hops:
            await self._drop(hop, background=False, clean=self._error is None and hop.done == len(self._offsets))

    async def __aenter__(self) -> "InferenceSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
