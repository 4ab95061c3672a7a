"""``AsyncBrokerClient``: the asyncio client (grpc.aio), the same surface as BrokerClient."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any

import grpc
import grpc.aio

from credential_broker_client import _common, models
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from credential_broker_client.cache import DEFAULT_MAX_ENTRIES, CredentialCache
from credential_broker_client.errors import BrokerError, DeadlineExceeded, from_rpc_error

log = logging.getLogger(_common.LOGGER_NAME)


class AsyncBrokerClient:
    """The asyncio twin of :class:`~credential_broker_client.BrokerClient`. Create it inside a
    running event loop; with ``cache=True`` the watch stream starts with the first call (or
    ``async with``). Close with :meth:`close` or ``async with``."""

    def __init__(
        self,
        target: str | None = None,
        *,
        caller_token: str | None = None,
        cache: bool = False,
        cache_max_entries: int = DEFAULT_MAX_ENTRIES,
        timeout: float = _common.DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = _common.resolve_target(target)
        self._metadata = _common.call_metadata(caller_token)
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.target, options=_common.CHANNEL_OPTIONS)
        self._stub = pb_grpc.CredentialBrokerStub(self._channel)
        self._cache = CredentialCache(cache_max_entries, clock) if cache else None
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_sequence: int | None = None

    def __repr__(self) -> str:
        return f"AsyncBrokerClient(target={self.target!r}, cache={self._cache is not None})"

    async def __aenter__(self) -> AsyncBrokerClient:
        self._start_watch()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the watch stream and close the channel: calls still running raise Cancelled,
        watch iterators end."""
        self._closed = True
        task = self._watch_task
        try:
            if task is not None:
                task.cancel()
                # Not ``await task``: its CancelledError would hide a cancellation of our own.
                await asyncio.wait([task])
        finally:
            await self._channel.close()

    @property
    def cache(self) -> CredentialCache | None:
        return self._cache

    async def wait_cache_live(self, timeout: float = 10.0) -> bool:
        """Wait until the cache's watch stream is established (the cache serves only then)."""
        self._start_watch()
        deadline = time.monotonic() + timeout
        while self._cache is not None and not self._cache.live and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._cache is not None and self._cache.live

    async def resolve(
        self,
        user_id: str,
        upstream: str,
        *,
        min_valid_seconds: int = 0,
        required_scopes: Collection[str] = (),
        subject_token: str | None = None,
        rejected_access_token: str | None = None,
        user_token: str | None = None,
        timeout: float | None = None,
    ) -> models.Credential:
        """See :meth:`BrokerClient.resolve`."""
        key = (user_id, upstream)
        cache = self._cache
        # A call carrying the user's own token is verified by the broker every time: never
        # answered from memory, and its answer is not kept for calls without it.
        per_user = subject_token is not None or bool(user_token)
        if cache is not None:
            if self._watch_task is None:
                self._start_watch()
            if not per_user and rejected_access_token is None:
                hit = cache.get(key, min_valid_seconds, required_scopes)
                if hit is not None:
                    return hit
            elif rejected_access_token is not None:
                cache.invalidate(key)
            ticket = cache.ticket(key)
        request = _common.resolve_request(
            user_id, upstream, min_valid_seconds, required_scopes, subject_token, rejected_access_token
        )
        answer = models.credential(
            await self._call("Resolve", self._stub.Resolve, request, timeout, user_token)
        )
        if cache is not None and not per_user:
            cache.put(key, answer, ticket)
        return answer

    async def build_authorization_url(
        self,
        user_id: str,
        upstream: str,
        *,
        connection_params: Mapping[str, str] | None = None,
        user_token: str | None = None,
        timeout: float | None = None,
    ) -> models.AuthorizationRequest:
        request = pb.BuildAuthorizationURLRequest(
            user_id=user_id, upstream=upstream, connection_params=dict(connection_params or {})
        )
        answer = await self._call(
            "BuildAuthorizationURL", self._stub.BuildAuthorizationURL, request, timeout, user_token
        )
        return models.authorization_request(answer)

    async def complete(
        self,
        state: str,
        code: str,
        user_id: str,
        *,
        iss: str = "",
        callback_params: Mapping[str, str] | None = None,
        user_token: str | None = None,
        timeout: float | None = None,
    ) -> models.CredentialInfo:
        request = _common.complete_request(state, code, user_id, iss, callback_params)
        answer = await self._call("Complete", self._stub.Complete, request, timeout, user_token)
        info = models.credential_info(answer.credential)
        self._forget(info.user_id, info.upstream)
        return info

    async def deny(
        self,
        state: str,
        error: str = "access_denied",
        error_description: str = "",
        *,
        timeout: float | None = None,
    ) -> None:
        request = pb.DenyRequest(state=state, error=error, error_description=error_description)
        await self._call("Deny", self._stub.Deny, request, timeout)

    async def refresh(
        self, user_id: str, upstream: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> models.CredentialInfo:
        self._forget(user_id, upstream)
        request = pb.RefreshRequest(user_id=user_id, upstream=upstream)
        answer = await self._call("Refresh", self._stub.Refresh, request, timeout, user_token)
        self._forget(user_id, upstream)
        return models.credential_info(answer.credential)

    async def list_connections(
        self, user_id: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> tuple[models.Connection, ...]:
        request = pb.ListConnectionsRequest(user_id=user_id)
        answer = await self._call("ListConnections", self._stub.ListConnections, request, timeout, user_token)
        return tuple(models.connection(c) for c in answer.connections)

    async def disconnect(
        self, user_id: str, upstream: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> models.Disconnection:
        self._forget(user_id, upstream)
        request = pb.DisconnectRequest(user_id=user_id, upstream=upstream)
        answer = await self._call("Disconnect", self._stub.Disconnect, request, timeout, user_token)
        self._forget(user_id, upstream)
        return models.disconnection(answer)

    async def disconnect_all(
        self, user_id: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> tuple[models.UpstreamDisconnection, ...]:
        request = pb.DisconnectAllRequest(user_id=user_id)
        answer = models.upstream_disconnections(
            await self._call("DisconnectAll", self._stub.DisconnectAll, request, timeout, user_token)
        )
        for result in answer:
            self._forget(user_id, result.upstream)
        return answer

    async def watch(
        self,
        user_id: str | None = None,
        upstreams: Collection[str] = (),
        *,
        after_sequence: int | None = None,
        user_token: str | None = None,
    ) -> AsyncIterator[models.ConnectionEvent]:
        """Connection events as they are committed; see :meth:`BrokerClient.watch`."""
        metadata = _common.outgoing(self._metadata, user_token)
        if self._closed:
            raise _common.closed_error("WatchConnections")
        call = self._stub.WatchConnections(
            _common.watch_request(user_id, upstreams, after_sequence), metadata=metadata
        )
        try:
            async for response in call:
                yield models.event(response.event)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            raise from_rpc_error(exc) from None
        except asyncio.CancelledError:
            if self._closed and not _cancel_requested():
                return  # close() cancelled the call, not our caller its task: the stream ended
            raise
        finally:
            call.cancel()

    def _forget(self, user_id: str, upstream: str) -> None:
        if self._cache is not None:
            self._cache.invalidate((user_id, upstream))

    async def _call(
        self,
        method: str,
        rpc: Callable[..., Awaitable[Any]],
        request: Any,
        timeout: float | None,
        user_token: str | None = None,
    ) -> Any:
        metadata = _common.outgoing(self._metadata, user_token)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 0
        error: BrokerError | None = None  # the last attempt's
        while True:
            if self._closed:
                raise _common.closed_error(method)
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # a backoff overslept (a busy machine): the last error stands
                raise error or DeadlineExceeded(f"{method}: the deadline passed before the broker answered")
            try:
                return await rpc(request, metadata=metadata, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError for a call that close() cancelled, though our
                # caller's task was not: that is the SDK's Cancelled, not a task cancellation.
                if self._closed and not _cancel_requested():
                    raise _common.closed_error(method) from None
                raise
            if not _common.retryable(method, error):
                raise error
            pause = _common.retry_pause(attempt, deadline - time.monotonic())
            if pause is None:
                raise error
            attempt += 1
            log.debug("%s: %s, retry %d in %.3f s", method, error.reason, attempt, pause)
            await asyncio.sleep(pause)

    def _start_watch(self) -> None:
        if self._cache is not None and self._watch_task is None and not self._closed:
            self._watch_task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        cache = self._cache
        assert cache is not None
        attempt = 0
        while not self._closed:
            request = _common.watch_request(None, (), self.last_sequence)
            call = self._stub.WatchConnections(request, metadata=self._metadata)
            up: float | None = None  # when the stream was registered (its headers came)
            try:
                await call.initial_metadata()  # the broker sends it once the watcher is registered
                if call.done():
                    reason = f"the stream ended ({(await call.code()).name})"
                else:
                    cache.set_live(True)
                    up = time.monotonic()
                    async for response in call:
                        attempt = 0  # a stream that delivers is healthy
                        event = models.event(response.event)
                        self.last_sequence = event.sequence
                        cache.apply(event)
                    reason = "the stream ended"
            except grpc.aio.AioRpcError as exc:
                reason = from_rpc_error(exc).reason
                if reason == "WATCH_RESYNC_REQUIRED":
                    self.last_sequence = None  # the cache is dropped anyway: watch from now on
            except Exception as exc:  # e.g. an event it cannot read: the watch must not die
                reason = f"unexpected {type(exc).__name__}"
            finally:
                cache.set_live(False)
                call.cancel()
            if up is not None and time.monotonic() - up >= _common.WATCH_HEALTHY_SECONDS:
                attempt = 0  # it stayed up: the next break starts the backoff over
            if self._closed:
                break
            log.info("credential cache dropped: watch stream broke (%s); resubscribing", reason)
            await asyncio.sleep(min(_common.WATCH_BACKOFF_CAP, _common.backoff(attempt)))
            attempt += 1


def _cancel_requested() -> bool:
    """Whether the running task was asked to stop (Task.cancelling, Python 3.11+; on 3.10 a
    cancellation that coincides with close() is not told apart from close())."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return bool(cancelling is not None and cancelling())
