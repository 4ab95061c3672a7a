"""``BrokerClient``: the synchronous client (grpc's blocking channel)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from credential_broker_client import _common, models
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credential_broker_client._proto.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from credential_broker_client.cache import DEFAULT_MAX_ENTRIES, CredentialCache
from credential_broker_client.errors import BrokerError, DeadlineExceeded, from_rpc_error

log = logging.getLogger(_common.LOGGER_NAME)
R = TypeVar("R")


class BrokerClient:
    """A client of the credential broker sidecar.

    ``target``: ``host:port``, ``unix:///path`` or an absolute socket path; default
    $CREDENTIAL_BROKER_SOCKET, then ``127.0.0.1:50051``. ``caller_token`` is sent as
    ``x-credential-broker-caller-token``; ``x-credential-broker-request: true`` always is.
    Every user-scoped method takes ``user_token``, the end user's token for a broker that
    verifies them (``identity:``), sent as ``authorization: Bearer`` on that call only.
    UNAVAILABLE is retried with jittered backoff within each call's ``timeout``; nothing else.

    With ``cache=True`` resolve answers come from memory while they satisfy the call, and one
    WatchConnections stream drops them the moment the broker reports a change (see
    :mod:`credential_broker_client.cache`). Use as a context manager or call :meth:`close`.
    """

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
        self._channel = grpc.insecure_channel(self.target, options=_common.CHANNEL_OPTIONS)
        self._stub = pb_grpc.CredentialBrokerStub(self._channel)
        self._closed = threading.Event()
        self._cache: CredentialCache | None = None
        self._watch_call: Any = None
        self._watch_thread: threading.Thread | None = None
        self.last_sequence: int | None = None
        if cache:
            self._cache = CredentialCache(cache_max_entries, clock)
            self._watch_thread = threading.Thread(
                target=self._follow, name="credential-broker-watch", daemon=True
            )
            self._watch_thread.start()

    def __repr__(self) -> str:
        return f"BrokerClient(target={self.target!r}, cache={self._cache is not None})"

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watch stream and close the channel: calls still running (or backing off)
        raise Cancelled, watch iterators end, and later calls raise Cancelled."""
        self._closed.set()
        call = self._watch_call
        if call is not None:
            call.cancel()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)
        self._channel.close()

    @property
    def cache(self) -> CredentialCache | None:
        """The cache (None without ``cache=True``): its ``hits``, ``misses`` and ``live``."""
        return self._cache

    def wait_cache_live(self, timeout: float = 10.0) -> bool:
        """Block until the cache's watch stream is established (the cache serves only then)."""
        deadline = time.monotonic() + timeout
        while self._cache is not None and not self._cache.live and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._cache is not None and self._cache.live

    # -- the RPCs -------------------------------------------------------------------------------

    def resolve(
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
        """A credential for (user, upstream) valid at least ``min_valid_seconds`` and holding
        ``required_scopes``. ``rejected_access_token``: the token the upstream just refused
        (the broker refreshes once when it is the stored one). ``user_token`` only
        authenticates the call (``subject_token``, when given, is the one the broker uses)."""
        key = (user_id, upstream)
        cache = self._cache
        # A call carrying the user's own token is verified by the broker every time: never
        # answered from memory, and its answer is not kept for calls without it.
        per_user = subject_token is not None or bool(user_token)
        if cache is not None:
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
        answer = models.credential(self._call("Resolve", self._stub.Resolve, request, timeout, user_token))
        if cache is not None and not per_user:
            cache.put(key, answer, ticket)
        return answer

    def build_authorization_url(
        self,
        user_id: str,
        upstream: str,
        *,
        connection_params: Mapping[str, str] | None = None,
        user_token: str | None = None,
        timeout: float | None = None,
    ) -> models.AuthorizationRequest:
        """Start a connect flow: the URL to send the user's browser to, and its state."""
        request = pb.BuildAuthorizationURLRequest(
            user_id=user_id, upstream=upstream, connection_params=dict(connection_params or {})
        )
        return models.authorization_request(
            self._call(
                "BuildAuthorizationURL", self._stub.BuildAuthorizationURL, request, timeout, user_token
            )
        )

    def complete(
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
        """Finish a connect flow with the callback's state and code."""
        request = _common.complete_request(state, code, user_id, iss, callback_params)
        info = models.credential_info(
            self._call("Complete", self._stub.Complete, request, timeout, user_token).credential
        )
        self._forget(info.user_id, info.upstream)
        return info

    def deny(
        self,
        state: str,
        error: str = "access_denied",
        error_description: str = "",
        *,
        timeout: float | None = None,
    ) -> None:
        """End a connect flow the user or the authorization server refused."""
        request = pb.DenyRequest(state=state, error=error, error_description=error_description)
        self._call("Deny", self._stub.Deny, request, timeout)

    def refresh(
        self, user_id: str, upstream: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> models.CredentialInfo:
        """Renew the stored credential now."""
        self._forget(user_id, upstream)
        request = pb.RefreshRequest(user_id=user_id, upstream=upstream)
        answer = self._call("Refresh", self._stub.Refresh, request, timeout, user_token)
        info = models.credential_info(answer.credential)
        self._forget(user_id, upstream)
        return info

    def list_connections(
        self, user_id: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> tuple[models.Connection, ...]:
        """The user's connection to every configured upstream (never a token)."""
        request = pb.ListConnectionsRequest(user_id=user_id)
        answer = self._call("ListConnections", self._stub.ListConnections, request, timeout, user_token)
        return tuple(models.connection(c) for c in answer.connections)

    def disconnect(
        self, user_id: str, upstream: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> models.Disconnection:
        """Revoke the user's tokens at the upstream and delete the credential."""
        self._forget(user_id, upstream)
        request = pb.DisconnectRequest(user_id=user_id, upstream=upstream)
        answer = models.disconnection(
            self._call("Disconnect", self._stub.Disconnect, request, timeout, user_token)
        )
        self._forget(user_id, upstream)
        return answer

    def disconnect_all(
        self, user_id: str, *, user_token: str | None = None, timeout: float | None = None
    ) -> tuple[models.UpstreamDisconnection, ...]:
        """Disconnect every upstream of a user (offboarding); one outcome per upstream."""
        request = pb.DisconnectAllRequest(user_id=user_id)
        answer = models.upstream_disconnections(
            self._call("DisconnectAll", self._stub.DisconnectAll, request, timeout, user_token)
        )
        for result in answer:
            self._forget(user_id, result.upstream)
        return answer

    def watch(
        self,
        user_id: str | None = None,
        upstreams: Collection[str] = (),
        *,
        after_sequence: int | None = None,
        user_token: str | None = None,
    ) -> Iterator[models.ConnectionEvent]:
        """Connection events as they are committed (never a token). Raises a BrokerError when
        the stream ends with one (e.g. WatchTooSlow: resume with the last ``sequence``). With
        user tokens verified, only one user's, with ``user_token``."""
        metadata = _common.outgoing(self._metadata, user_token)
        if self._closed.is_set():
            raise _common.closed_error("WatchConnections")
        try:
            call = self._stub.WatchConnections(
                _common.watch_request(user_id, upstreams, after_sequence), metadata=metadata
            )
        except ValueError:  # grpc's answer on a closed channel
            if not self._closed.is_set():
                raise
            raise _common.closed_error("WatchConnections") from None
        try:
            for response in call:
                yield models.event(response.event)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed.is_set():
                return
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    # -- plumbing -------------------------------------------------------------------------------

    def _forget(self, user_id: str, upstream: str) -> None:
        if self._cache is not None:
            self._cache.invalidate((user_id, upstream))

    def _call(
        self,
        method: str,
        rpc: Callable[..., R],
        request: Any,
        timeout: float | None,
        user_token: str | None = None,
    ) -> R:
        """One RPC, UNAVAILABLE retried until the deadline; ``user_token``: see the class doc."""
        metadata = _common.outgoing(self._metadata, user_token)
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 0
        error: BrokerError | None = None  # the last attempt's
        while True:
            if self._closed.is_set():
                raise _common.closed_error(method)
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # a backoff overslept (a busy machine): the last error stands
                raise error or DeadlineExceeded(f"{method}: the deadline passed before the broker answered")
            try:
                return rpc(request, metadata=metadata, timeout=remaining)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            except ValueError:  # grpc's answer on a channel another thread just closed
                if not self._closed.is_set():
                    raise
                raise _common.closed_error(method) from None
            if not _common.retryable(method, error):
                raise error
            pause = _common.retry_pause(attempt, deadline - time.monotonic())
            if pause is None:
                raise error
            attempt += 1
            log.debug("%s: %s, retry %d in %.3f s", method, error.reason, attempt, pause)
            if self._closed.wait(pause):  # close() ends the backoff at once
                raise _common.closed_error(method)

    def _follow(self) -> None:
        """The cache's WatchConnections stream: resubscribes with after_sequence after a break."""
        assert self._cache is not None
        attempt = 0
        while not self._closed.is_set():
            request = _common.watch_request(None, (), self.last_sequence)
            call = self._stub.WatchConnections(request, metadata=self._metadata)
            self._watch_call = call
            up: float | None = None  # when the stream was registered (its headers came)
            if self._closed.is_set():
                call.cancel()
                break
            try:
                call.initial_metadata()  # the broker sends it once the watcher is registered
                if call.done():
                    raise _Ended(call.code())
                self._cache.set_live(True)
                up = time.monotonic()
                for response in call:
                    attempt = 0  # a stream that delivers is healthy
                    event = models.event(response.event)
                    self.last_sequence = event.sequence
                    self._cache.apply(event)
                reason = "the stream ended"
            except _Ended as ended:
                reason = f"the stream ended ({ended.code})"
            except grpc.RpcError as exc:
                reason = from_rpc_error(exc).reason
                if reason == "WATCH_RESYNC_REQUIRED":
                    self.last_sequence = None  # the cache is dropped anyway: watch from now on
            except Exception as exc:  # e.g. an event it cannot read: the watch must not die
                call.cancel()
                reason = f"unexpected {type(exc).__name__}"
            finally:
                self._cache.set_live(False)
            if up is not None and time.monotonic() - up >= _common.WATCH_HEALTHY_SECONDS:
                attempt = 0  # it stayed up: the next break starts the backoff over
            if self._closed.is_set():
                break
            log.info("credential cache dropped: watch stream broke (%s); resubscribing", reason)
            self._closed.wait(min(_common.WATCH_BACKOFF_CAP, _common.backoff(attempt)))
            attempt += 1


class _Ended(Exception):
    """A watch call that ended before it started."""

    def __init__(self, code: Any) -> None:
        super().__init__(str(code))
        self.code = code


__all__ = ["BrokerClient", "BrokerError"]
