"""``BrokerAuth``: an ``httpx.Auth`` (sync and async) that sends the broker's credential and,
on one 401 from the upstream, resolves again with ``rejected_access_token`` and retries once.
Needs the ``httpx`` extra."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection, Generator
from typing import Any

import httpx

from credential_broker_client._common import same_origin
from credential_broker_client.aio import AsyncBrokerClient
from credential_broker_client.client import BrokerClient
from credential_broker_client.models import Credential


class BrokerAuth(httpx.Auth):
    """Authenticate httpx requests as ``user_id`` at ``upstream``.

    ``client`` is a BrokerClient (sync httpx.Client, or httpx.AsyncClient where a blocking
    resolve is acceptable) or an AsyncBrokerClient (httpx.AsyncClient only).

    The request body is read before the first send, so the one retry resends all of it (a
    streamed body is held in memory). Only a 401 from the origin (scheme, host, port) the
    credential was sent to counts as a rejection; one from another origin reached by a redirect
    is returned untouched.

    Redirects: when the client does not follow them (httpx's default), our header is taken off
    ``response.next_request`` if it leads to another origin. With ``follow_redirects=True`` httpx
    follows them inside the client, where an auth cannot act: it strips ``Authorization`` on a
    cross-origin hop (but keeps it on an http to https upgrade of the same host), and copies any
    other header. So for an upstream whose header is not ``Authorization`` (an API key header),
    do not let the client follow redirects."""

    def __init__(
        self,
        client: BrokerClient | AsyncBrokerClient,
        user_id: str,
        upstream: str,
        *,
        min_valid_seconds: int = 0,
        required_scopes: Collection[str] = (),
        user_token: str | None = None,
    ) -> None:
        self._client = client
        self._user = user_id
        self._upstream = upstream
        # user_token: the end user's, for a broker that verifies them (never in the repr).
        self._options: dict[str, Any] = {
            "min_valid_seconds": min_valid_seconds,
            "required_scopes": tuple(required_scopes),
            "user_token": user_token,
        }

    def __repr__(self) -> str:
        return f"BrokerAuth(user_id={self._user!r}, upstream={self._upstream!r})"

    @staticmethod
    def _apply(request: httpx.Request, old: Credential | None, new: Credential) -> None:
        if old is not None and old.header_name.lower() != new.header_name.lower():
            request.headers.pop(old.header_name, None)
        request.headers[new.header_name] = new.header_value

    @staticmethod
    def _guard(request: httpx.Request, response: httpx.Response, sent: Credential) -> None:
        """Take our header off a redirect to another origin that the caller may follow by hand."""
        following = response.next_request
        if following is not None and not same_origin(str(request.url), str(following.url)):
            following.headers.pop(sent.header_name, None)

    @staticmethod
    def _rejects(request: httpx.Request, response: httpx.Response) -> bool:
        """A 401 from the origin we sent the credential to (not from one a redirect led to)."""
        return response.status_code == 401 and same_origin(str(request.url), str(response.request.url))

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._client, BrokerClient):
            raise TypeError("BrokerAuth with an AsyncBrokerClient needs httpx.AsyncClient")
        request.read()  # a streamed body could not be sent a second time
        sent = self._client.resolve(self._user, self._upstream, **self._options)
        self._apply(request, None, sent)
        response = yield request
        self._guard(request, response, sent)
        if not self._rejects(request, response):
            return
        fresh = self._client.resolve(
            self._user, self._upstream, rejected_access_token=sent.access_token, **self._options
        )
        self._apply(request, sent, fresh)
        response = yield request
        self._guard(request, response, fresh)

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()  # a streamed body could not be sent a second time
        sent = await self._resolve(None)
        self._apply(request, None, sent)
        response = yield request
        self._guard(request, response, sent)
        if not self._rejects(request, response):
            return
        fresh = await self._resolve(sent.access_token)
        self._apply(request, sent, fresh)
        response = yield request
        self._guard(request, response, fresh)

    async def _resolve(self, rejected: str | None) -> Credential:
        if isinstance(self._client, AsyncBrokerClient):
            return await self._client.resolve(
                self._user, self._upstream, rejected_access_token=rejected, **self._options
            )
        return self._client.resolve(
            self._user, self._upstream, rejected_access_token=rejected, **self._options
        )
