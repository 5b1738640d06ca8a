"""The STEPS protocol of a block server: one-token steps of many sessions in one frame per hop.

A client sends the steps its sessions on one chain take in the same moment as one ``steps`` frame
(swarm/step_groups.py); a server checks each row against its session as a ``step`` is checked
(position, truncations, cache room), computes the rows through the batcher as one batch, pushes
the output on to the next server as one ``steps`` frame and answers each row's client in one
``outputs`` frame on that client's STEPS stream (a row its session cannot take is answered by an
error in the same frame, and the others go on). The per-session frames, tasks and writes that a
step of each session costs on every hop are what this saves.

The rows stay the sessions' steps: they advance the sessions' caches, a replay's duplicate is
dropped, and a session's client recovers any row as it recovers its own steps.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import trio

from blocks.cache import SessionLimitError, UnknownSessionError
from blocks.span import BlockSpan
from blockserver import incoming
from blockserver.inference import InferenceService, _LiveSession
from swarm import codec, protocol
from swarm.protocol import ProtocolError, Stream

logger = logging.getLogger(__name__)

GROUPS_IN_FLIGHT = 8  # groups of one stream computing or delivering at once (a client's chains, pushes of several)


@dataclass(eq=False)
class _Row:
    index: int  # in the frame: its place in the route's session lists
    live: _LiveSession
    span: BlockSpan
    cache: Any
    position: int
    truncations: int
    hidden: torch.Tensor


class StepGroupService:
    def __init__(self, inference: InferenceService) -> None:
        self.inference = inference
        self._answers: dict[str, Stream] = {}  # a client's peer id -> its STEPS stream, where its rows are answered
        self._next: dict[str, Stream] = {}  # a next server's peer id -> our STEPS stream to it
        self._opening = trio.Lock()  # one STEPS stream per next server
        self._writing: weakref.WeakKeyDictionary[Stream, trio.Lock] = weakref.WeakKeyDictionary()

    async def handle(self, stream: Stream) -> None:
        """A client's or a previous server's STEPS stream: ``hello``, then groups until it ends."""
        peer = stream.muxed_conn.peer_id.to_base58()
        limits, answers = self.inference.limits, False
        try:
            hello = incoming.expect(await incoming.read(stream, limits, limits.read_timeout), "hello")
            answers = hello.get("answers") is True  # a client's: it reads its rows' answers here
            if answers:
                self._answers[peer] = stream
            await self._write(stream, {"type": "ready"})
            async with trio.open_nursery() as nursery:  # (errors caught inside: not as exception groups)
                await self._groups(stream, nursery, peer if answers else None)
        except (ProtocolError, ValueError) as error:
            logger.info("steps stream from %s refused: %s", peer, error)
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except Exception as error:
            logger.info("steps stream from %s ended: %r", peer, error)
        finally:
            if self._answers.get(peer) is stream:
                del self._answers[peer]
            # a pusher reads nothing back: reset, so its next write fails rather than vanishing
            await (incoming.try_close if answers else incoming.try_reset)(stream)

    async def _groups(self, stream: Stream, nursery: trio.Nursery, client: str | None) -> None:
        """Each group read from `stream` computed in a task of its own, a few at a time; a malformed
        one ends them. `client`: the peer whose rows these are (None: a pusher's; the frame names it)."""
        limits, in_flight = self.inference.limits, trio.Semaphore(GROUPS_IN_FLIGHT)
        try:
            while True:
                message = incoming.expect(await incoming.read(stream, limits), "steps")
                group = _rows(message, limits.max_sessions, limits.max_batch), _route(message)
                named = message.get("client")
                await in_flight.acquire()
                nursery.start_soon(self._run, message, *group, client or (named if isinstance(named, str) else None),
                                   in_flight)
        except EOFError:
            pass
        except (ProtocolError, ValueError) as error:
            logger.info("steps stream refused: %s", error)
            await incoming.try_send(stream, protocol.error_frame(str(error)))

    async def _run(self, message: dict[str, Any], entries: list[tuple[str, int, int, int]], route: list[dict[str, Any]],
                   client: str | None, in_flight: trio.Semaphore) -> None:
        try:
            await self._group(message, entries, route, client)
        except Exception:  # a bug here must not end the stream's other groups
            logger.exception("step group failed")
            self.inference.metrics.errors.labels("compute").inc()
        finally:
            in_flight.release()

    async def _group(self, message: dict[str, Any], entries: list[tuple[str, int, int, int]], route: list[dict[str, Any]],
                     client: str | None) -> None:
        service = self.inference
        batches = [entry[3] for entry in entries]
        try:
            hidden = incoming.expect_hidden(message, "hidden", service.span, batch=sum(batches),
                                            max_elements=sum(batches) * service.span.hidden_size)
            if hidden.shape[1] != 1 or any(len(hop["sessions"]) != len(entries) for hop in route):
                raise ProtocolError("a step group's rows are one token each, with a session per row on every later hop")
        except (ProtocolError, codec.CodecError) as error:
            service.metrics.errors.labels("bad_step").inc()
            await self._answer_errors(client, [(entry[0], entry[1], "error", str(error)) for entry in entries])
            return
        rows, errors = [], []
        for index, ((session_id, position, truncations, batch), part) in enumerate(zip(entries, hidden.split(batches))):
            try:
                if (row := self._begin(index, session_id, position, truncations, batch, part, message)) is not None:
                    rows.append(row)
            except (ProtocolError, ValueError, UnknownSessionError, SessionLimitError) as error:
                code = protocol.BUSY if isinstance(error, SessionLimitError) else "error"
                errors.append((session_id, position, code, str(error)))
        await self._compute_and_deliver(rows, route, message["hidden"]["codec"], errors, client)
        if unowned := [error for error in errors if error[0] not in service.live]:
            await self._answer_errors(client, unowned)  # (a session ended here: its client replaces the hop at once)

    def _begin(self, index: int, session_id: str, position: int, truncations: int, batch: int, hidden: torch.Tensor,
               message: dict[str, Any]) -> _Row | None:
        """The row as its session takes it (its cache advanced), or None for a replay's duplicate."""
        service = self.inference
        live = service.live.get(session_id)
        if live is None:
            raise UnknownSessionError(f"no session {session_id} here")
        session = service.caches.get(session_id)
        if session.batch != batch or live.codec != message["hidden"]["codec"]:
            raise ProtocolError(f"session {session_id} has another batch or codec")
        if not service.new_position(session, position, truncations):
            return None
        if position != session.position:
            raise ProtocolError(f"step at position {position}, but the session is at {session.position}")
        session.advance(1)
        return _Row(index, live, live.span or service.span, session.cache, position, truncations, hidden)

    async def _compute_and_deliver(self, rows: list[_Row], route: list[dict[str, Any]], wire_codec: str,
                                   errors: list[tuple[str, int, str, str]], client: str | None) -> None:
        """The rows in the batcher's `split` micro-batches (on a CPU: the next server computes one
        while this one computes the next, as for steps of their own), each pushed on and answered
        as soon as it is computed; the rows' errors go with the first."""
        size = -(-len(rows) // max(1, self.inference.batcher.split)) or 1
        async with trio.open_nursery() as nursery:
            for start in range(0, max(len(rows), 1), size):
                started, chunk = time.perf_counter(), rows[start:start + size]
                outputs = await self._compute(chunk)
                nursery.start_soon(self._deliver, chunk, outputs, route, wire_codec, [] if start else errors,
                                   time.perf_counter() - started, client)

    async def _deliver(self, rows: list[_Row], outputs: list[torch.Tensor | Exception], route: list[dict[str, Any]],
                       wire_codec: str, errors: list[tuple[str, int, str, str]], seconds: float,
                       client: str | None) -> None:
        """Computed rows pushed on as one group, then answered to their clients with `errors`, one
        frame per client."""
        service, errors = self.inference, list(errors)
        done = [row for row, output in zip(rows, outputs) if not isinstance(output, Exception)]
        for row, output in zip(rows, outputs):
            if isinstance(output, Exception) and row.live.id in service.live:
                errors.append((row.live.id, row.position, "error", f"step failed: {output!r}"))
                row.live.cancel.cancel()  # a failed computation leaves the cache unusable: the session ends
        if done:
            service.metrics.step_seconds.observe(seconds)
            service.metrics.steps.inc(len(done))
            service.metrics.tokens.inc(sum(row.hidden.shape[0] for row in done))
            service.metrics.group_rows.observe(len(done))
        output = codec.encode(torch.cat([o for o in outputs if not isinstance(o, Exception)]), wire_codec) if done else None
        pushed = bool(route) and output is not None and await self._push(done, route, output, client)
        by_owner: defaultdict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(done):
            by_owner[row.live.owner].append(index)
        parts = codec.split_rows(output, [row.hidden.shape[0] for row in done]) if output is not None else []
        for owner in set(by_owner) | {service.live[e[0]].owner for e in errors if e[0] in service.live}:
            mine = [done[index] for index in by_owner.get(owner, [])]
            hidden = codec.join_rows([parts[index] for index in by_owner[owner]]) if mine else None
            owned = [error for error in errors if error[0] in service.live and service.live[error[0]].owner == owner]
            await self._answer(owner, mine, hidden, pushed, route, owned)

    async def _compute(self, rows: list[_Row]) -> list[torch.Tensor | Exception]:
        """Each row's output on the host: those that batch through the batcher together, others alone."""
        service = self.inference
        closed = RuntimeError("the session closed")
        outputs: dict[int, torch.Tensor | Exception] = {id(row): closed for row in rows if not self._open(row)}
        batched = [row for row in rows if id(row) not in outputs and row.span.batches(row.cache)]
        if batched:  # queued with no await since the check: a session closing later is dropped by `forget`
            results = await service.batcher.step_rows(
                [(row.span, row.hidden, row.cache, row.position, row.live.adapter) for row in batched])
            outputs.update(zip(map(id, batched), results))
        for row in rows:
            if id(row) not in outputs and not self._open(row):
                outputs[id(row)] = closed
            elif id(row) not in outputs:
                try:
                    computed = await service.compute_chunked(row.live, row.span, row.hidden, row.cache, row.position)
                    outputs[id(row)] = await service.on_host(computed, "decode")
                except Exception as error:
                    outputs[id(row)] = error
        return [outputs[id(row)] for row in rows]

    def _open(self, row: _Row) -> bool:
        """Whether the row's session is still open (its cache, and its pool rows, still its own)."""
        return self.inference.live.get(row.live.id) is row.live

    async def _push(self, rows: list[_Row], route: list[dict[str, Any]], output: dict[str, Any],
                    client: str | None) -> bool:
        """The rows' output on to the next server as one group; False where that failed (the rows'
        clients then send each step on themselves)."""
        service, hop = self.inference, route[0]
        frame = {"type": "steps", "hidden": output,
                 "rows": [[hop["sessions"][row.index], row.position, row.truncations, row.hidden.shape[0]] for row in rows],
                 "route": [{**later, "sessions": [later["sessions"][row.index] for row in rows]} for later in route[1:]]}
        if client is not None:
            frame["client"] = client  # where errors for rows of sessions not there go
        try:
            with protocol.time_limit(service.limits.push_timeout):
                stream = await self._next_stream(hop["peer"], hop.get("addrs"))
                await self._write(stream, frame)
            return True
        except Exception as error:
            service.metrics.errors.labels("push").inc()
            logger.info("could not push a step group on to %s: %r", hop["peer"], error)
            if (stream := self._next.pop(hop["peer"], None)) is not None:
                await protocol.close_quietly(stream)
            return False

    async def _next_stream(self, peer: str, addrs: Any) -> Stream:
        async with self._opening:
            if (stream := self._next.get(peer)) is None:
                addrs = [a for a in addrs if isinstance(a, str)][:8] if isinstance(addrs, list) else []
                stream = await self.inference.node.open_stream(peer, protocol.STEPS, addrs)
                try:
                    await protocol.request(stream, {"type": "hello"}, "ready", keep_open=True,
                                           timeout=self.inference.limits.push_timeout)
                except BaseException:
                    await protocol.close_quietly(stream)
                    raise
                self._next[peer] = stream
            return stream

    async def _answer(self, owner: str, rows: list[_Row], hidden: dict[str, Any] | None, pushed: bool,
                      route: list[dict[str, Any]], errors: list[tuple[str, int, str, str]]) -> None:
        """One ``outputs`` frame on the owner's STEPS stream; without one, each row's ``output`` (or
        error) on its session's own stream, as a step of its own would have been answered."""
        stream = self._answers.get(owner)
        if stream is not None:
            frame: dict[str, Any] = {"type": "outputs", "sessions": [row.live.id for row in rows],
                                     "positions": [row.position for row in rows],
                                     "batches": [row.hidden.shape[0] for row in rows], "pushed": pushed}
            if hidden is not None:
                frame["hidden"] = hidden
            if errors:
                frame["errors"] = [list(error) for error in errors]
            await self._try_write(owner, stream, frame)
            return
        parts = codec.split_rows(hidden, [row.hidden.shape[0] for row in rows]) if hidden is not None else []
        for row, part in zip(rows, parts):
            reply = {"type": "output", "position": row.position, "hidden": part}
            if pushed:
                reply["pushed"] = route[0]["sessions"][row.index]
            await incoming.try_send(row.live.client, reply)
        for session_id, _, code, text in errors:
            if (live := self.inference.live.get(session_id)) is not None:
                await incoming.try_send(live.client, protocol.error_frame(text, code))

    async def _answer_errors(self, client: str | None, errors: list[tuple[str, int, str, str]]) -> None:
        """Errors for rows of no session here, to the client whose rows they are (its sessions replace
        the hop at once, rather than after a step's timeout)."""
        if client is not None and errors and (stream := self._answers.get(client)) is not None:
            await self._try_write(client, stream, {"type": "outputs", "sessions": [], "positions": [], "batches": [],
                                                   "errors": [list(error) for error in errors]})

    def _lock(self, stream: Stream) -> trio.Lock:
        if (lock := self._writing.get(stream)) is None:
            self._writing[stream] = lock = trio.Lock()
        return lock

    async def _write(self, stream: Stream, frame: dict[str, Any]) -> None:
        async with self._lock(stream):  # groups finish in any order; frames must not interleave
            await protocol.write_frame(stream, frame)

    async def _try_write(self, client: str, stream: Stream, frame: dict[str, Any]) -> None:
        """An answer to `client`; one it does not take within the push timeout (it stopped reading)
        ends its STEPS stream, so it holds up no other client's groups."""
        with trio.move_on_after(self.inference.limits.push_timeout) as late:
            try:
                await self._write(stream, frame)
            except Exception:
                pass  # the client is gone: its sessions end with their own streams
        if late.cancelled_caught:
            if self._answers.get(client) is stream:
                del self._answers[client]
            await incoming.try_reset(stream)


def _rows(message: dict[str, Any], max_rows: int, max_batch: int) -> list[tuple[str, int, int, int]]:
    rows = message.get("rows")
    if not isinstance(rows, list) or not 0 < len(rows) <= max_rows:
        raise ProtocolError(f"'rows' must list 1 to {max_rows} steps")
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                and all(type(value) is int for value in row[1:]) and 0 < row[3] <= max_batch):
            raise ProtocolError(f"each row must be [session, position, truncations, batch of 1 to {max_batch}]")
    if len({row[0] for row in rows}) < len(rows):
        raise ProtocolError("a session steps once per group")
    return [tuple(row) for row in rows]  # type: ignore[misc]


def _route(message: dict[str, Any]) -> list[dict[str, Any]]:
    route = message.get("route") or []
    if not isinstance(route, list) or not all(
            isinstance(hop, dict) and isinstance(hop.get("peer"), str) and isinstance(hop.get("sessions"), list)
            and all(isinstance(session, str) for session in hop["sessions"]) for hop in route):
        raise ProtocolError("'route' must list maps of a peer and its sessions")
    return route
