"""``BrokerAuth``: an ``httpx.Auth`` (sync and async) that sends the broker's credential and,
on one 401 from the upstream, resolves again with ``rejected_access_token`` and retries once.
Needs the ``httpx`` extra."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection, Generator
from typing import Any

import httpx

from credential_broker_client.aio import AsyncBrokerClient
from credential_broker_client.client import BrokerClient
from credential_broker_client.models import Credential


class BrokerAuth(httpx.Auth):
    """Authenticate httpx requests as ``user_id`` at ``upstream``.

    ``client`` is a BrokerClient (sync httpx.Client, or httpx.AsyncClient where a blocking
    resolve is acceptable) or an AsyncBrokerClient (httpx.AsyncClient only)."""

    requires_request_body = True  # the body is replayed on the one retry

    def __init__(
        self,
        client: BrokerClient | AsyncBrokerClient,
        user_id: str,
        upstream: str,
        *,
        min_valid_seconds: int = 0,
        required_scopes: Collection[str] = (),
    ) -> None:
        self._client = client
        self._user = user_id
        self._upstream = upstream
        self._options: dict[str, Any] = {
            "min_valid_seconds": min_valid_seconds,
            "required_scopes": tuple(required_scopes),
        }

    def __repr__(self) -> str:
        return f"BrokerAuth(user_id={self._user!r}, upstream={self._upstream!r})"

    @staticmethod
    def _apply(request: httpx.Request, old: Credential | None, new: Credential) -> None:
        if old is not None and old.header_name.lower() != new.header_name.lower():
            request.headers.pop(old.header_name, None)
        request.headers[new.header_name] = new.header_value

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not isinstance(self._client, BrokerClient):
            raise TypeError("BrokerAuth with an AsyncBrokerClient needs httpx.AsyncClient")
        sent = self._client.resolve(self._user, self._upstream, **self._options)
        self._apply(request, None, sent)
        response = yield request
        if response.status_code != 401:
            return
        fresh = self._client.resolve(
            self._user, self._upstream, rejected_access_token=sent.access_token, **self._options
        )
        self._apply(request, sent, fresh)
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        sent = await self._resolve(None)
        self._apply(request, None, sent)
        response = yield request
        if response.status_code != 401:
            return
        fresh = await self._resolve(sent.access_token)
        self._apply(request, sent, fresh)
        yield request

    async def _resolve(self, rejected: str | None) -> Credential:
        if isinstance(self._client, AsyncBrokerClient):
            return await self._client.resolve(
                self._user, self._upstream, rejected_access_token=rejected, **self._options
            )
        return self._client.resolve(
            self._user, self._upstream, rejected_access_token=rejected, **self._options
        )
