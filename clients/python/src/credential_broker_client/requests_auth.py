"""``BrokerRequestsAuth``: a ``requests`` auth that sends the broker's credential and, on one 401
from the upstream, resolves again with ``rejected_access_token`` and resends once. Needs the
``requests`` extra."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import requests
from requests.auth import AuthBase

from credential_broker_client.client import BrokerClient
from credential_broker_client.models import Credential


class BrokerRequestsAuth(AuthBase):
    """``session.get(url, auth=BrokerRequestsAuth(client, "alice", "github"))``."""

    def __init__(
        self,
        client: BrokerClient,
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
        return f"BrokerRequestsAuth(user_id={self._user!r}, upstream={self._upstream!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        sent = self._client.resolve(self._user, self._upstream, **self._options)
        request.headers[sent.header_name] = sent.header_value
        body_position = _body_position(request)
        state = {"retried": False}

        def retry_on_401(response: requests.Response, **kwargs: Any) -> requests.Response:
            if response.status_code != 401 or state["retried"]:
                return response
            state["retried"] = True
            fresh: Credential = self._client.resolve(
                self._user, self._upstream, rejected_access_token=sent.access_token, **self._options
            )
            response.content  # noqa: B018 - drain the body so the connection can be reused
            response.close()
            again = response.request.copy()
            if body_position is not None and hasattr(again.body, "seek"):
                again.body.seek(body_position)
            if fresh.header_name.lower() != sent.header_name.lower():
                again.headers.pop(sent.header_name, None)
            again.headers[fresh.header_name] = fresh.header_value
            assert response.connection is not None
            retried: requests.Response = response.connection.send(again, **kwargs)
            retried.history.append(response)
            retried.request = again
            return retried

        request.register_hook("response", retry_on_401)
        return request


def _body_position(request: requests.PreparedRequest) -> int | None:
    tell = getattr(request.body, "tell", None)
    if tell is None:
        return None
    try:
        return int(tell())
    except OSError:
        return None
