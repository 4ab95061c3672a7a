"""The HTTP client for token endpoints: httpx, bounded bodies, one place for error translation."""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import httpx

from broker.config import ClientAuthMethod
from broker.errors import TokenRequestRejected, UpstreamUnavailable
from broker.oauth.rfc6749 import TokenResponse, basic_credentials, parse_token_response
from broker.oauth.rfc7523 import CLIENT_ASSERTION_TYPE
from broker.oauth.rfc9110 import retry_after_seconds
from broker.oauth.tls import certificate_problem, untrusted
from broker.tracing import NO_SPANS, Spans


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """How the broker authenticates to one authorization server (RFC 6749 section 2.3; with
    private_key_jwt, RFC 7523 section 2.2: ``assertion`` makes the JWT for each request, and may
    raise ClientAssertionUnavailable, before anything is sent)."""

    client_id: str | None
    client_secret: str | None
    method: ClientAuthMethod
    assertion: Callable[[], str] | None = None

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r}, method={self.method.value})"

    def apply(self, form: list[tuple[str, str]], headers: dict[str, str]) -> None:
        if self.method is ClientAuthMethod.CLIENT_SECRET_BASIC:
            headers["Authorization"] = basic_credentials(self.client_id or "", self.client_secret or "")
            return
        if self.method is ClientAuthMethod.PRIVATE_KEY_JWT:
            assert self.assertion is not None  # by broker.oauth.client_auth
            value = self.assertion()
            self._add_client_id(form)
            form += [("client_assertion_type", CLIENT_ASSERTION_TYPE), ("client_assertion", value)]
        elif self.method is ClientAuthMethod.CLIENT_SECRET_POST:
            self._add_client_id(form)
            form.append(("client_secret", self.client_secret or ""))
        elif self.client_id:
            self._add_client_id(form)

    def _add_client_id(self, form: list[tuple[str, str]]) -> None:
        # A pushed authorization request (RFC 9126) already names the client: never twice.
        if self.client_id and not any(key == "client_id" for key, _ in form):
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

    ``verify``: the outbound SSL context (broker/oauth/tls.py; ``http.ca_file``), shared by
    every pool; True is httpx's default trust. A certificate that fails verification is its own
    error ("certificate not trusted"), not "could not reach".
    """

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrent_requests: int = 10,
        spans: Spans = NO_SPANS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.timeout = timeout
        self._verify = verify
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
                verify=self._verify,
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
        answer = await self._post_form(endpoint, form, credentials, upstream, deadline, json_body, "token")
        try:
            return parse(answer.status, answer.body)
        except (TokenRequestRejected, UpstreamUnavailable) as exc:
            # RFC 9110 section 10.2.3: the server said when to come back (a 429 or 503); the
            # refresh backoff honours it (broker/lifecycle.py). Never read from the body.
            if exc.retry_after is None:
                exc.retry_after = answer.retry_after
            raise

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
        answer = await self._post_form(endpoint, form, credentials, upstream, deadline, json_body, call)
        return answer.status, answer.body

    async def _post_form(
        self,
        endpoint: str,
        form: Sequence[tuple[str, str]],
        credentials: ClientCredentials,
        upstream: str | None,
        deadline: float | None,
        json_body: bool,
        call: str,
    ) -> Answer:
        """One POST in its trace span (``call``: ``token`` or ``revocation``): the answer's
        status, its bounded body and the wait its Retry-After asks for."""
        with self.spans.http(call, "POST", endpoint, upstream=upstream) as span:
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
                        span.status(resp.status_code)
                        return Answer(resp.status_code, body, _retry_after(resp))
            except (TimeoutError, httpx.TimeoutException):
                if not have_slot:
                    raise UpstreamUnavailable(
                        "timed out waiting for a free token request slot for this upstream "
                        "(http.max_concurrent_requests); the authorization server is slow"
                    ) from None
                raise UpstreamUnavailable("the authorization server timed out") from None
            except httpx.HTTPError as exc:
                # The exception text can name the URL; it is dropped on purpose.
                problem = certificate_problem(exc)
                if problem is not None:
                    raise UpstreamUnavailable(untrusted("the authorization server", problem)) from None
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


class Answer(NamedTuple):
    """A token endpoint's answer: status, bounded body, and the wait its Retry-After asks for."""

    status: int
    body: bytes
    retry_after: float | None = None


#: The statuses whose Retry-After means "come back then" (RFC 6585 section 4, RFC 9110 section
#: 15.6.4); on any other status the header is ignored.
RETRY_AFTER_STATUSES = frozenset({429, 503})


def _retry_after(resp: httpx.Response) -> float | None:
    if resp.status_code not in RETRY_AFTER_STATUSES:
        return None
    return retry_after_seconds(resp.headers.get("retry-after"), resp.headers.get("date"), time.time())


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
