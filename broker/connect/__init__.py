"""Hosted connect: the broker's own HTTP listener for the browser side of a connect flow.

With ``connect`` configured, BuildAuthorizationURL (and the ``authorization_url`` of a
NOT_CONNECTED, RECONNECT_REQUIRED or INSUFFICIENT_SCOPE answer) is a one-time link to this
listener's ``/start``. Opening it binds the browser to the flow with a random secret in a cookie
(the store keeps its hash) and sends the browser on to the authorization server; the server
comes back to ``/callback``, which completes the flow only for the browser holding that cookie,
then sends the browser to the application's ``return_to`` with the outcome. Nobody has to write
a callback, and a callback URL taken to another browser (login CSRF) is refused.

- binding.py: the cookie secret (pure functions)
- flows.py: the use cases, start and callback (no HTTP)
- pages.py: the few fixed pages a browser may see (never a token, code or state)
- server.py: the aiohttp listener
"""
