"""``BrokerRequestsAuth``: a ``requests`` auth that sends the broker's credential and, on one 401
from the upstream, resolves again with ``rejected_access_token`` and resends once. Needs the
``requests`` extra."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any
from urllib.parse import urljoin

import requests
from requests.auth import AuthBase

from credential_broker_client._common import same_origin
from credential_broker_client.client import BrokerClient


class BrokerRequestsAuth(AuthBase):
    """``session.get(url, auth=BrokerRequestsAuth(client, "alice", "github"))``.

    Only a 401 from the origin (scheme, host, port) the credential was sent to counts as a
    rejection: one that comes from another origin after a redirect is returned untouched. Our
    header is taken off a request before requests follows a redirect to another origin (requests
    itself strips only ``Authorization``).

    The 401 is retried only when the body can be sent again: none, bytes, str, or a file that is
    rewound to where it started. Any other body (a generator, a pipe) was consumed by the first
    send, so its 401 is returned as is; the credential is still resolved again with
    ``rejected_access_token``, so the caller's next request carries a fresh token."""

    def __init__(
        self,
        client: BrokerClient,
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
        return f"BrokerRequestsAuth(user_id={self._user!r}, upstream={self._upstream!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        sent = self._client.resolve(self._user, self._upstream, **self._options)
        request.headers[sent.header_name] = sent.header_value
        url = str(request.url)
        header_names = {sent.header_name}
        body_position = _body_position(request)
        retried = False

        def on_response(response: requests.Response, **kwargs: Any) -> requests.Response:
            nonlocal retried
            if response.is_redirect and not same_origin(
                url, urljoin(response.url, response.headers["location"])
            ):
                for name in header_names:  # requests copies this request to follow the redirect
                    response.request.headers.pop(name, None)
            if response.status_code != 401 or retried or not same_origin(url, str(response.request.url)):
                return response
            retried = True
            fresh = self._client.resolve(
                self._user, self._upstream, rejected_access_token=sent.access_token, **self._options
            )
            again = response.request
            if not _rewound(again.body, body_position):
                return response
            response.content  # noqa: B018 - drain the body so the connection can be reused
            response.close()
            # Changed in place: requests follows a redirect from the retry by copying this request.
            for name in header_names:
                again.headers.pop(name, None)
            again.headers[fresh.header_name] = fresh.header_value
            header_names.add(fresh.header_name)
            assert response.connection is not None
            answer: requests.Response = response.connection.send(again, **kwargs)
            answer.history.append(response)
            return on_response(answer, **kwargs)  # the retry's own redirect, if any

        request.register_hook("response", on_response)
        return request


def _body_position(request: requests.PreparedRequest) -> int | None:
    """Where a file body starts, to rewind it for the retry; None for any other body."""
    tell = getattr(request.body, "tell", None)
    if tell is None or not hasattr(request.body, "seek"):
        return None
    try:
        return int(tell())
    except OSError:
        return None


def _rewound(body: Any, position: int | None) -> bool:
    """Whether the body can be sent again, rewinding a file body to ``position`` first."""
    if body is None or isinstance(body, (bytes, str)):
        return True
    if position is None:
        return False
    body.seek(position)
    return True
