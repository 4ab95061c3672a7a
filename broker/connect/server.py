"""The hosted connect HTTP listener, served by aiohttp: ``GET {path}/start`` and
``GET {path}/callback``, where ``{path}`` is the path of ``connect.public_url``.

Every answer carries ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer`` (so neither
the /start link nor the callback's code and state leave in a Referer header), a CSP that allows
nothing (``default-src 'none'; frame-ancestors 'none'``) and ``X-Content-Type-Options:
nosniff``. The access log is off: request lines carry the callback's code and state. HEAD is not
served (a link preview must not use up a one-time link).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from broker.config import ConnectConfig, is_loopback, listen_host
from broker.connect import pages
from broker.connect.binding import cookie_secrets, cookie_value, is_reference, new_secret, secret_hash
from broker.connect.flows import HostedConnect, Outcome
from broker.errors import BrokerError, ConfigError, InvalidArgument, StoreError
from broker.logs import fields, get_logger
from broker.preflight import describe_bind_error

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
# The callback parameters read here; each may appear at most once.
_CALLBACK_SINGLE = ("state", "code", "error", "error_description", "iss")


async def _secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    response.headers["Server"] = "credential-broker"  # not the framework and its version


class _ProtocolLog(logging.Logger):
    """aiohttp's own log for a request it answers before any handler runs (an oversized request
    line or header, bytes that are not HTTP). Its exception text quotes the request: the start
    of the callback URL (``state``, ``code``) or of the Cookie header (the binding secret). So
    only a fixed line goes on, to the broker's log, naming the error's class."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(target.name + ".connect.http")
        self._target = target

    def handle(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        self._target.log(
            min(record.levelno, logging.WARNING),  # the client's doing, not the broker's
            "hosted connect: a request could not be read",
            extra=fields(error=type(error).__name__ if error is not None else None),
        )


def _html(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8")


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


class ConnectServer:
    """The listener: started and stopped with the broker (broker/app.py)."""

    def __init__(
        self,
        config: ConnectConfig,
        hosted: HostedConnect,
        cookie_max_age: int,
        logger: logging.Logger | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._config = config
        # serve --workers N: every worker binds the same port (the flows are in the store).
        self._reuse_port = reuse_port
        self._hosted = hosted
        self._max_age = cookie_max_age
        self._log = logger or get_logger()
        public = urlsplit(config.public_url)
        self._path = public.path.rstrip("/")
        # Secure unless the public URL is plain http on loopback, where a browser would drop it.
        self._secure = public.scheme == "https" or not is_loopback(public.hostname or "")
        self._runner: web.AppRunner | None = None
        #: The bound host:port once started.
        self.address: str | None = None

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(_secure_headers)
        app.router.add_get(self._path + "/start", self._start, allow_head=False)
        app.router.add_get(self._path + "/callback", self._callback, allow_head=False)
        return app

    async def start(self) -> None:
        """Bind and serve. Raises ConfigError (one line, naming connect.listen) when the
        address cannot be bound."""
        runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, logger=_ProtocolLog(self._log)
        )
        await runner.setup()
        listen = self._config.listen
        host, port = listen_host(listen) or "", int(listen.rpartition(":")[2])
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=self._reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"connect.listen: {describe_bind_error(listen, exc)}") from None
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.address = f"{host}:{bound}"
        self._log.info("hosted connect listening", extra=fields(address=self.address))

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers ------------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Fixed pages for every error: no framework text, no exception detail, no request data."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _html(404, pages.NOT_FOUND)
        except web.HTTPMethodNotAllowed as exc:
            response = _html(405, pages.BAD_REQUEST)
            response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
            return response
        except web.HTTPException:
            return _html(400, pages.BAD_REQUEST)
        except StoreError as exc:
            self._log.warning("hosted connect: the store failed", extra=fields(error=exc.code))
            return _html(503, pages.UNAVAILABLE)
        except BrokerError as exc:  # e.g. a pushed authorization request (RFC 9126) that failed
            self._log.warning("hosted connect: the upstream failed", extra=fields(error=exc.code))
            return _html(502, pages.PROVIDER_FAILED)
        except Exception as exc:  # a bug: a fixed page, the class name in the log, never the text
            self._log.error("hosted connect request failed", extra=fields(error=type(exc).__name__))
            return _html(500, pages.UNAVAILABLE)

    async def _start(self, request: web.Request) -> web.StreamResponse:
        references = request.query.getall("flow", [])
        if len(references) != 1 or not is_reference(references[0]):
            return _html(400, pages.BAD_REQUEST)
        secret = new_secret()
        url = await self._hosted.start(references[0], secret_hash(secret))
        if url is None:
            return _html(410, pages.LINK_USED)
        response = _redirect(url)
        kept = cookie_secrets(request.cookies.get(self._config.cookie_name))
        self._set_cookie(response, [*kept, secret])
        return response

    async def _callback(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        if any(len(query.getall(name, [])) > 1 for name in _CALLBACK_SINGLE):
            return _html(400, pages.BAD_REQUEST)
        kept = cookie_secrets(request.cookies.get(self._config.cookie_name))
        hashes = {secret_hash(secret): secret for secret in kept}
        try:
            outcome = await self._hosted.callback(
                query.get("state", ""),
                list(hashes),
                code=query.get("code", ""),
                error=query.get("error", ""),
                iss=query.get("iss", ""),
                # The rest (e.g. QuickBooks' realmId), for the upstream's declared connection fields.
                callback_params={k: v for k, v in query.items() if k not in _CALLBACK_SINGLE},
            )
        except InvalidArgument:
            return _html(400, pages.BAD_REQUEST)
        if outcome is None:
            return _html(403, pages.NOT_THIS_BROWSER)
        response = _redirect(self._return_to(outcome))
        if outcome.used_hash is not None:
            self._set_cookie(response, [s for s in kept if s != hashes[outcome.used_hash]])
        return response

    # -- helpers -------------------------------------------------------------------------

    def _set_cookie(self, response: web.StreamResponse, secrets: list[str]) -> None:
        """Write the cookie with these secrets, or clear it when there are none left."""
        attributes = {
            "path": self._path or "/",
            "secure": self._secure,
            "httponly": True,
            "samesite": "Lax",
        }
        name = self._config.cookie_name
        if secrets:
            response.set_cookie(name, cookie_value(secrets), max_age=self._max_age, **attributes)  # type: ignore[arg-type]
        else:
            response.del_cookie(name, **attributes)  # type: ignore[arg-type]

    def _return_to(self, outcome: Outcome) -> str:
        """``return_to`` with upstream, status and reason added to its own query."""
        parts = urlsplit(self._config.return_to)
        query = parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, v) for k, v in query if k not in ("upstream", "status", "reason")]
        if outcome.upstream:
            query.append(("upstream", outcome.upstream))
        query.append(("status", outcome.status))
        if outcome.reason:
            query.append(("reason", outcome.reason))
        return urlunsplit(parts._replace(query=urlencode(query)))
