"""The fixed pages of the hosted connect listener. Static text: nothing from the request, the
flow or the authorization server is ever put in a page (no token, code, state or user)."""

from __future__ import annotations

import html


def page(title: str, text: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )


LINK_USED = page(
    "Link no longer valid",
    "This connect link is no longer valid: each link works once, in one browser, and expires. "
    "Go back to the application and start connecting again.",
)
NOT_THIS_BROWSER = page(
    "Connection not completed",
    "This sign-in could not be matched to this browser: it was started in another browser, or it "
    "was already used. Nothing was connected. Go back to the application and connect again.",
)
BAD_REQUEST = page("Bad request", "This is not a valid connect request.")
UNAVAILABLE = page(
    "Temporarily unavailable", "The connection service cannot answer right now. Try again in a moment."
)
# /start binds the link to the browser before the authorization server is asked (a pushed
# authorization request), so after such a failure the link is used up: no "try again".
PROVIDER_FAILED = page(
    "Sign-in could not start",
    "The sign-in service of this connection could not be reached. Nothing was connected. "
    "Go back to the application and connect again.",
)
NOT_FOUND = page("Not found", "There is nothing here.")
