"""The HTTP client for token endpoints: httpx, bounded bodies, one place for error translation."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from broker.config import ClientAuthMethod
from broker.errors import UpstreamUnavailable
from broker.oauth.rfc6749 import TokenResponse, basic_credentials, parse_token_response
from broker.tracing import NO_SPANS, Spans


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """How the broker authenticates to one authorization server (RFC 6749 section 2.3)."""

    client_id: str | None
    client_secret: str | None
    method: ClientAuthMethod

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r}, method={self.method.value})"

    def apply(self, form: list[tuple[str, str]], headers: dict[str, str]) -> None:
        if self.method is ClientAuthMethod.CLIENT_SECRET_BASIC:
            headers["Authorization"] = basic_credentials(self.client_id or "", self.client_secret or "")
        elif self.method is ClientAuthMethod.CLIENT_SECRET_POST:
            form += [
                ("client_id", self.client_id or ""),
                ("client_secret", self.client_secret or ""),
            ]
        elif self.client_id:
            form.append(("client_id", self.client_id))


class TokenEndpointClient:
    """Posts token requests. The transport is injectable; bodies are capped at ``max_bytes``
    after decompression; every failure becomes an UpstreamUnavailable or TokenRequestRejected.

    Bulkheads, so one slow or hung authorization server never delays another:

    - each token endpoint host (scheme, host, port) gets its own connection pool;
    - each upstream gets at most ``max_concurrent_requests`` requests in flight at once (the
      others wait for a slot). Requests made without an upstream (revocation) share one
      bulkhead per host.

    ``timeout`` bounds each request as a whole, by an asyncio deadline: the wait for a slot,
    connect, send, and every byte of the answer. A server that answers one byte at a time is
    cut at the deadline, not let run for as long as each read stays under a per-read timeout.

    ``spans``: each request is a client span (broker/tracing/), when tracing is on.
    """

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrent_requests: int = 10,
        spans: Spans = NO_SPANS,
    ) -> None:
        self.timeout = timeout
        self.spans = spans
        self._max_bytes = max_bytes
        self._transport = transport
        self._max_concurrent = max_concurrent_requests
        self._pools: dict[tuple[str, str, int | None], httpx.AsyncClient] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    def _pool(self, origin: tuple[str, str, int | None]) -> httpx.AsyncClient:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = httpx.AsyncClient(
                # The per-operation timeouts are a backstop; the deadline in post_form rules.
                timeout=httpx.Timeout(self.timeout),
                # Concurrency is bounded per upstream by the slots below, not by the pool, so a
                # pool never makes a request wait behind another upstream's.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=self._max_concurrent),
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
                headers={"Accept": "application/json", "Accept-Encoding": "gzip, identity"},
            )
        return pool

    def _slot(self, key: str) -> asyncio.Semaphore:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(self._max_concurrent)
        return slot

    async def request_token(
        self,
        endpoint: str,
        form: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        *,
        upstream: str | None = None,
        deadline: float | None = None,
        json_body: bool = False,
        parse: Callable[[int, bytes], TokenResponse] = parse_token_response,
    ) -> TokenResponse:
        """Post a token request and parse the answer. ``upstream`` picks the bulkhead;
        ``deadline`` (event-loop time) replaces "now + timeout" when the caller must know the
        request is over by then (a refresh under a lease). ``json_body`` sends the fields as a
        JSON object instead of a form; ``parse`` reads the answer (an upstream's knobs)."""
        status, body = await self.post_form(
            endpoint, form, credentials, upstream=upstream, deadline=deadline, json_body=json_body
        )
        return parse(status, body)

    async def post_form(
        self,
        endpoint: str,
        form: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        *,
        upstream: str | None = None,
        deadline: float | None = None,
        json_body: bool = False,
        call: str = "token",
    ) -> tuple[int, bytes]:
        """Post ``form`` and read the answer's status and (bounded) body. ``call`` names the kind
        of request in its trace span: ``token`` or ``revocation``."""
        with self.spans.http(call, "POST", endpoint, upstream=upstream) as span:
            status, body = await self._post_form(endpoint, form, credentials, upstream, deadline, json_body)
            span.status(status)
            return status, body

    async def _post_form(
        self,
        endpoint: str,
        form: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        upstream: str | None,
        deadline: float | None,
        json_body: bool,
    ) -> tuple[int, bytes]:
        fields = list(form)
        headers: dict[str, str] = {}
        credentials.apply(fields, headers)
        url = httpx.URL(endpoint)
        origin = (url.scheme, url.host, url.port)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.timeout if deadline is None else deadline
        have_slot = False
        try:
            async with (
                asyncio.timeout_at(until),
                self._slot(upstream or f"{url.scheme}://{url.netloc.decode()}"),
            ):
                have_slot = True
                values = dict_multi(fields)
                async with self._pool(origin).stream(
                    "POST",
                    url,
                    headers=headers,
                    data=None if json_body else values,
                    json=values if json_body else None,
                ) as resp:
                    body = await self._read(resp)
                    return resp.status_code, body
        except (TimeoutError, httpx.TimeoutException):
            if not have_slot:
                raise UpstreamUnavailable(
                    "timed out waiting for a free token request slot for this upstream "
                    "(http.max_concurrent_requests); the authorization server is slow"
                ) from None
            raise UpstreamUnavailable("the authorization server timed out") from None
        except httpx.HTTPError:
            # The exception text can name the URL; it is dropped on purpose.
            raise UpstreamUnavailable("could not reach the authorization server") from None

    async def _read(self, resp: httpx.Response) -> bytes:
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", ""):
            raise UpstreamUnavailable("the authorization server used an unsupported content encoding")
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        out = bytearray()
        async for chunk in resp.aiter_raw():
            if inflate is not None:
                # max_length bounds each step: a small gzip bomb cannot inflate past the cap.
                try:
                    chunk = inflate.decompress(chunk, self._max_bytes + 1 - len(out))
                except zlib.error:
                    raise UpstreamUnavailable("the authorization server sent a corrupt gzip body") from None
                if inflate.unconsumed_tail:
                    raise UpstreamUnavailable("the authorization server's answer is too large")
            out += chunk
            if len(out) > self._max_bytes:
                raise UpstreamUnavailable("the authorization server's answer is too large")
        return bytes(out)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.aclose()


def dict_multi(fields: Sequence[tuple[str, str]]) -> dict[str, str | list[str]]:
    """httpx takes repeated form fields as a list value."""
    out: dict[str, str | list[str]] = {}
    for key, value in fields:
        if key in out:
            prior = out[key]
            out[key] = [*prior, value] if isinstance(prior, list) else [prior, value]
        else:
            out[key] = value
    return out
