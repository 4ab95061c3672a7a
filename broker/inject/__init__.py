"""Kubernetes sidecar injection for credential-broker.

:mod:`broker.inject.webhook` is a mutating admission webhook that adds the broker as a
native sidecar (an init container with ``restartPolicy: Always``) to pods annotated
``credential-broker.io/inject: "true"``. It only uses the standard library at runtime.
"""
