"""The HTTP client for token endpoints: httpx, bounded bodies, one place for error translation."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from broker.config import ClientAuthMethod
from broker.errors import UpstreamUnavailable
from broker.oauth.rfc6749 import TokenResponse, basic_credentials, parse_token_response


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
    after decompression; every failure becomes an UpstreamUnavailable or TokenRequestRejected."""

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept": "application/json", "Accept-Encoding": "gzip, identity"},
        )

    async def request_token(
        self, endpoint: str, form: Sequence[tuple[str, str]], credentials: ClientCredentials
    ) -> TokenResponse:
        status, body = await self.post_form(endpoint, form, credentials)
        return parse_token_response(status, body)

    async def post_form(
        self, endpoint: str, form: Sequence[tuple[str, str]], credentials: ClientCredentials
    ) -> tuple[int, bytes]:
        fields = list(form)
        headers: dict[str, str] = {}
        credentials.apply(fields, headers)
        try:
            async with self._http.stream("POST", endpoint, data=dict_multi(fields), headers=headers) as resp:
                body = await self._read(resp)
                return resp.status_code, body
        except httpx.TimeoutException:
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
        await self._http.aclose()


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
