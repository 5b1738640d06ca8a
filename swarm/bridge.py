"""The one place where asyncio meets trio (DESIGN.md §2).

py-libp2p runs on trio, FastAPI on asyncio. ``SwarmBridge`` runs a ``SwarmNode`` and a
``SwarmClient`` on a trio loop in a thread of their own; asyncio code awaits swarm operations
through it, and cancelling the awaiting asyncio task (a client that disconnects) cancels the
trio work too. Blocking callers (tests, scripts) use ``call``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, Collection, Sequence, TypeVar

import torch
import trio
from libp2p.crypto.keys import KeyPair

from common.mailbox import LoopMailbox, Mailbox
from swarm.client import SwarmClient
from swarm.node import RTT_PROBE_INTERVAL, start_node
from swarm.records import ServerRecord
from swarm.hops import SessionConfig, SessionRequest
from swarm.session import InferenceSession

T = TypeVar("T")
logger = logging.getLogger(__name__)


class SwarmBridge:
    def __init__(
        self,
        *,
        initial_peers: Sequence[str],
        listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        psk: str | None = None,
        key_pair: KeyPair | None = None,
        allow_peers: Collection[str] | None = None,
        step_timeout: float = SessionConfig.step_timeout,
        verify_fraction: float = SessionConfig.verify_fraction,
        rtt_probe_interval: float | None = RTT_PROBE_INTERVAL,
    ) -> None:
        """`rtt_probe_interval`: seconds between rounds of pings that keep routing's round-trip
        estimates fresh (`SwarmNode.probe_rtts`); None leaves them to session opens alone."""
        self._node_args = dict(
            listen=listen, initial_peers=initial_peers, psk=psk, key_pair=key_pair, allow_peers=allow_peers
        )
        self._step_timeout = step_timeout
        self._verify_fraction = verify_fraction
        self._rtt_probe_interval = rtt_probe_interval
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._to_trio: Mailbox | None = None
        self._to_asyncio = LoopMailbox()
        self._replies: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}  # this trio batch's, per loop
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self.client: SwarmClient | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SwarmBridge":
        self._thread = threading.Thread(target=self._run_trio, name="swarm", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("swarm node did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(30)

    def _run_trio(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as error:
            self._error = error
        finally:
            self._started.set()

    async def _main(self) -> None:
        async with start_node(**self._node_args) as node:
            self.client = SwarmClient(node, step_timeout=self._step_timeout, verify_fraction=self._verify_fraction)
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._rtt_probe_interval is not None:
                    nursery.start_soon(node.probe_rtts, self._rtt_probe_interval)
                nursery.start_soon(self.client.inference_streams.expire_forever)
                await nursery.start(self.client.groups.run)
                self._token = trio.lowlevel.current_trio_token()
                self._to_trio = Mailbox(self._token.run_sync_soon)
                self._started.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

    # -- calling into trio -------------------------------------------------------------------------
    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a trio coroutine function from any non-trio thread and wait for it."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def snapshot(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the trio thread (reads of swarm state without races)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any,
                  discard: Callable[[T], Awaitable[object]] | None = None) -> T:
        """Await a trio coroutine function from asyncio; asyncio cancellation reaches trio. A
        result that comes after its caller was cancelled goes to `discard` (in trio), e.g. a
        session opened as its request went away, which nobody else would close."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)
            elif error is None and discard is not None:
                self._discard(discard, result)

        def reply(result: Any, error: BaseException | None) -> None:  # from the trio thread
            self._reply(loop, lambda: settle(result, error))

        async def task() -> None:
            # Unless fn finishes: cancelled by asyncio (harmless) or the bridge is stopping.
            result, error = None, ConnectionError("swarm client stopped")
            try:
                with scope:
                    result, error = await fn(*args), None
            except Exception as failure:
                error = failure
            finally:
                reply(result, error)

        def start() -> None:
            try:
                nursery.start_soon(task)
            except RuntimeError:  # the bridge is stopping: its nursery takes no new tasks
                reply(None, ConnectionError("swarm client stopped"))

        assert self._token is not None and self._to_trio is not None and self._nursery is not None, "bridge not started"
        nursery = self._nursery
        try:
            self._to_trio.send(start)
        except trio.RunFinishedError:
            raise ConnectionError("swarm client stopped") from None
        try:
            return await future
        except asyncio.CancelledError:
            if discard is not None and future.done() and not future.cancelled() and future.exception() is None:
                self._discard(discard, future.result())  # settled, then cancelled before this task resumed
            try:
                self._token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass  # stopped: nothing runs there to cancel
            raise

    def _reply(self, loop: asyncio.AbstractEventLoop, settle: Callable[[], None]) -> None:
        """(Trio thread.) `settle` on `loop` soon, with the other replies of this trio batch in one
        call: a step group's sessions finish in the same batch, and one wakeup of the event loop
        (a syscall, a hand-over of the GIL) then settles them all instead of one each."""
        pending = self._replies.setdefault(loop, [])
        pending.append(settle)
        if len(pending) == 1:
            try:
                assert self._nursery is not None
                self._nursery.start_soon(self._send_replies, loop)  # runs after this batch's tasks
            except RuntimeError:  # the bridge is stopping: its nursery takes no new tasks
                self._send_replies_now(loop)

    async def _send_replies(self, loop: asyncio.AbstractEventLoop) -> None:
        self._send_replies_now(loop)

    def _send_replies_now(self, loop: asyncio.AbstractEventLoop) -> None:
        settles = self._replies.pop(loop, [])
        try:
            self._to_asyncio.to(loop).send(lambda: _settle_all(settles))
        except RuntimeError:
            pass  # the asyncio loop is closed: nobody awaits these any more

    def _discard(self, discard: Callable[[Any], Awaitable[object]], result: Any) -> None:
        """`discard(result)` in trio, soon; its failure is logged (the bridge is stopping: skipped)."""
        async def quietly() -> None:
            try:
                await discard(result)
            except Exception:
                logger.warning("discarding an abandoned result failed", exc_info=True)

        def start() -> None:
            try:
                nursery.start_soon(quietly)
            except RuntimeError:
                pass  # stopping: its resources go with the node

        nursery = self._nursery
        try:
            if self._to_trio is not None and nursery is not None:
                self._to_trio.send(start)
        except trio.RunFinishedError:
            pass

    # -- the swarm, for asyncio callers ------------------------------------------------------------
    async def open_session(self, request: SessionRequest) -> "BridgedSession":
        """``SwarmClient.start``, awaited from asyncio (a session opened as its caller is cancelled is closed)."""
        client = self.client
        assert client is not None
        opened = await self.run(lambda: client.start(request), discard=lambda session: session.close())
        return BridgedSession(self, opened)

    def servers(self, model: str | None = None) -> list[ServerRecord]:
        assert self.client is not None
        return self.snapshot(lambda: self.client.node.records.live(model))

    def banned(self) -> list[dict[str, Any]]:
        """Peers this gateway banned for wrong outputs: ``[{peer_id, reason, since}]``, oldest first."""
        assert self.client is not None
        return self.snapshot(lambda: [ban.to_json() for ban in self.client.bans.entries()])

    def rtts(self) -> dict[str, float]:
        """Measured round trip (seconds) to each peer this client has talked to."""
        assert self.client is not None
        return self.snapshot(self.client.node.rtts)

    def verification(self) -> dict[str, int]:
        """Checks, mismatches, undecided mismatches and bans of this gateway's verification so far."""
        assert self.client is not None
        return self.client.verification.to_json()

    def replays(self) -> int:
        """Failed hops replaced and replayed so far, over all sessions."""
        assert self.client is not None
        return self.client.replays

    def step_groups(self) -> dict[str, int]:
        """Step groups sent so far, and the sessions' steps they carried (swarm/step_groups.py)."""
        assert self.client is not None
        return {"groups": self.client.groups.frames, "rows": self.client.groups.rows}


def _settle_all(settles: list[Callable[[], None]]) -> None:
    for settle in settles:
        try:
            settle()
        except Exception:  # one caller's failure is its own
            logger.exception("settling a swarm call's result failed")


class BridgedSession:
    """An ``InferenceSession`` seen from asyncio."""

    def __init__(self, bridge: SwarmBridge, session: InferenceSession) -> None:
        self._bridge = bridge
        self._session = session

    @property
    def chain(self) -> list[ServerRecord]:
        return self._session.chain

    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        return await self._bridge.run(self._session.step, hidden, tail)

    async def truncate(self, position: int) -> None:
        await self._bridge.run(self._session.truncate, position)

    async def close(self) -> None:
        await asyncio.shield(self._bridge.run(self._session.close))

    async def __aenter__(self) -> "BridgedSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
