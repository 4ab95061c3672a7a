"""Mutating admission webhook that injects credential-broker as a native sidecar.

It works like Vault Agent's injector: the API server sends an ``AdmissionReview`` (v1) for
every pod CREATE the ``MutatingWebhookConfiguration`` selects; for pods annotated
``credential-broker.io/inject: "true"`` the webhook answers with an RFC 6902 JSON patch that

* prepends the broker as a *native sidecar* (an init container with
  ``restartPolicy: Always``, Kubernetes >= 1.29) with gRPC startup, liveness and readiness
  probes on its health-only listener;
* adds its volumes: the socket ``emptyDir`` shared with the app, the config ``ConfigMap``,
  the keyring ``Secret`` and a data ``emptyDir``;
* gives every app container (``spec.containers``) the ``CREDENTIAL_BROKER_SOCKET`` env var
  and a read-only mount of the socket directory;
* sets the annotation ``credential-broker.io/status: injected``.

:func:`mutate` is a pure function (dict in, dict out) so it can be tested without a cluster.
It fails safe: whatever it is given, it returns a well-formed ``AdmissionReview`` response
with ``allowed: true``; on malformed input there is no patch and a warning explains why. It
never blocks pod creation (the webhook is also registered with ``failurePolicy: Ignore``).

:func:`serve` runs it behind a small HTTPS server built on :mod:`http.server` and
:mod:`ssl`; :func:`main` is the command-line entry point (``credential-broker
inject-webhook``).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

__all__ = [
    "ANNOTATION_CONFIG_MAP",
    "ANNOTATION_INJECT",
    "ANNOTATION_KEYRING_SECRET",
    "ANNOTATION_STATUS",
    "SIDECAR_NAME",
    "SOCKET_ENV",
    "InjectSettings",
    "main",
    "make_server",
    "mutate",
    "serve",
]

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "credential-broker.io/"
#: Set to ``"true"`` on a pod to request injection.
ANNOTATION_INJECT = ANNOTATION_PREFIX + "inject"
#: Name of the ConfigMap (key ``config.yaml``) holding the broker configuration.
ANNOTATION_CONFIG_MAP = ANNOTATION_PREFIX + "config-map"
#: Name of the Secret (key ``keyring.json``) holding the broker keyring.
ANNOTATION_KEYRING_SECRET = ANNOTATION_PREFIX + "keyring-secret"
#: Written by the webhook; ``injected`` once the sidecar has been added.
ANNOTATION_STATUS = ANNOTATION_PREFIX + "status"
STATUS_INJECTED = "injected"

SIDECAR_NAME = "credential-broker"
SOCKET_ENV = "CREDENTIAL_BROKER_SOCKET"

VOLUME_SOCKET = "credential-broker-socket"
VOLUME_CONFIG = "credential-broker-config"
VOLUME_KEYRING = "credential-broker-keyring"
VOLUME_DATA = "credential-broker-data"

SOCKET_DIR = "/var/run/credential-broker"
SOCKET_PATH = SOCKET_DIR + "/broker.sock"
CONFIG_DIR = "/etc/credential-broker"
CONFIG_KEY = "config.yaml"
CONFIG_PATH = CONFIG_DIR + "/" + CONFIG_KEY
KEYRING_DIR = CONFIG_DIR + "/keyring"
# The keyring Secret's file mode (octal 0440): owner and group may read, nobody else.
KEYRING_MODE = 0o440
DATA_DIR = "/var/lib/credential-broker"

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"
WARNING_PREFIX = "credential-broker-injector: "

#: Default cap on a request body. The API server limits objects to ~1.5 MiB and whole
#: requests to 3 MiB, so an AdmissionReview for a pod CREATE never comes close.
DEFAULT_MAX_BODY_BYTES = 3 * 1024 * 1024

# RFC 1123 DNS subdomain, the rule for ConfigMap and Secret names.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class InjectSettings:
    """What the injector puts into pods.

    Attributes:
        image: The credential-broker image reference for the sidecar.
        default_config_map: ConfigMap used when the pod has no
            ``credential-broker.io/config-map`` annotation.
        default_keyring_secret: Secret used when the pod has no
            ``credential-broker.io/keyring-secret`` annotation.
        image_pull_policy: ``imagePullPolicy`` of the sidecar.
        health_port: Port of the broker's health-only gRPC listener (config key
            ``health_listen``); the sidecar's probes use it.
        run_as_user: Fixed non-root uid (and gid) the sidecar runs as (the image's user).
    """

    image: str
    default_config_map: str = "credential-broker-config"
    default_keyring_secret: str = "credential-broker-keyring"
    image_pull_policy: str = "IfNotPresent"
    health_port: int = 8086
    run_as_user: int = 10001


class _Reject(Exception):
    """Raised inside :func:`mutate` when a pod cannot be patched safely; carries the warning."""


def _escape(token: str) -> str:
    """Escape one JSON-pointer reference token (RFC 6901): ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def _response(uid: str, patch: list[dict[str, Any]] | None, warnings: list[str]) -> dict[str, Any]:
    """Build an AdmissionReview v1 response that allows the request."""
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        encoded = json.dumps(patch, separators=(",", ":")).encode("utf-8")
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(encoded).decode("ascii")
    if warnings:
        response["warnings"] = [WARNING_PREFIX + w for w in warnings]
    return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}


def _sidecar(settings: InjectSettings) -> dict[str, Any]:
    """The native sidecar container: an init container with ``restartPolicy: Always``."""
    grpc_probe = {"grpc": {"port": settings.health_port}}
    return {
        "name": SIDECAR_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["serve", "--config", CONFIG_PATH],
        "restartPolicy": "Always",
        "ports": [{"name": "cb-health", "containerPort": settings.health_port, "protocol": "TCP"}],
        # App containers start only once the startup probe has succeeded.
        "startupProbe": {**grpc_probe, "periodSeconds": 1, "failureThreshold": 30},
        "livenessProbe": {**grpc_probe, "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {**grpc_probe, "periodSeconds": 5, "failureThreshold": 3},
        "resources": {
            "requests": {"cpu": "10m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": VOLUME_SOCKET, "mountPath": SOCKET_DIR},
            {"name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": VOLUME_KEYRING, "mountPath": KEYRING_DIR, "readOnly": True},
            {"name": VOLUME_DATA, "mountPath": DATA_DIR},
        ],
    }


def _volumes(config_map: str, keyring_secret: str) -> list[dict[str, Any]]:
    return [
        {"name": VOLUME_SOCKET, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": VOLUME_CONFIG,
            "configMap": {"name": config_map, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]},
        },
        # Group-readable only: the broker refuses a keyring others can read. The kubelet makes
        # the files root:fsGroup, and fsGroup is a supplementary group of every container.
        {"name": VOLUME_KEYRING, "secret": {"secretName": keyring_secret, "defaultMode": KEYRING_MODE}},
        {"name": VOLUME_DATA, "emptyDir": {}},
    ]


def _fs_group_ops(
    spec: dict[str, Any], settings: InjectSettings, warnings: list[str]
) -> list[dict[str, Any]]:
    """A pod without an fsGroup gets the sidecar's group as its fsGroup, so the sidecar can read
    its group-only keyring; a pod's own fsGroup is kept (the sidecar is in that group too)."""
    context = spec.get("securityContext")
    if context is not None and not isinstance(context, dict):
        raise _Reject("spec.securityContext is not an object")
    if context is not None and context.get("fsGroup") is not None:
        return []
    warnings.append(
        f"spec.securityContext.fsGroup set to {settings.run_as_user} so the sidecar can read its keyring"
    )
    if context is None:
        return [{"op": "add", "path": "/spec/securityContext", "value": {"fsGroup": settings.run_as_user}}]
    return [{"op": "add", "path": "/spec/securityContext/fsGroup", "value": settings.run_as_user}]


def _list_field(obj: dict[str, Any], key: str, what: str) -> list[Any] | None:
    """Return ``obj[key]`` if it is a list, ``None`` if absent/null; reject anything else."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Reject(f"{what} is not a list")
    return value


def _append_ops(path: str, existing: list[Any] | None, items: list[Any]) -> list[dict[str, Any]]:
    """JSON-patch ops appending ``items`` to the array at ``path``.

    An absent (or empty) array is added whole, since ``/-`` needs an existing array.
    """
    if not existing:
        return [{"op": "add", "path": path, "value": items}]
    return [{"op": "add", "path": path + "/-", "value": item} for item in items]


def _resource_name(annotations: dict[str, Any], key: str, default: str) -> str:
    value = annotations.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(value):
        raise _Reject(f"annotation {key} is not a valid object name")
    return value


def _pod_patch(
    pod: dict[str, Any], settings: InjectSettings, warnings: list[str]
) -> list[dict[str, Any]] | None:
    """The JSON patch injecting the sidecar into ``pod``, or ``None`` if nothing to do."""
    metadata = pod.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _Reject("pod metadata is not an object")
    annotations = metadata.get("annotations")
    if annotations is None:
        annotations = {}
    if not isinstance(annotations, dict):
        raise _Reject("pod annotations are not an object")

    inject = annotations.get(ANNOTATION_INJECT)
    if not isinstance(inject, str) or inject.strip().lower() != "true":
        return None
    if annotations.get(ANNOTATION_STATUS) == STATUS_INJECTED:
        return None

    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise _Reject("pod spec is missing")
    containers = _list_field(spec, "containers", "spec.containers")
    if not containers or not all(isinstance(c, dict) for c in containers):
        raise _Reject("spec.containers is empty or malformed")
    init_containers = _list_field(spec, "initContainers", "spec.initContainers")
    if init_containers is not None and not all(isinstance(c, dict) for c in init_containers):
        raise _Reject("spec.initContainers is malformed")
    if any(c.get("name") == SIDECAR_NAME for c in init_containers or []):
        return None  # Already injected (by us or by hand): leave the pod alone.
    if any(c.get("name") == SIDECAR_NAME for c in containers):
        raise _Reject(f"a container is already named {SIDECAR_NAME}")

    volumes = _list_field(spec, "volumes", "spec.volumes")
    if volumes is not None and not all(isinstance(v, dict) for v in volumes):
        raise _Reject("spec.volumes is malformed")
    ours = {VOLUME_SOCKET, VOLUME_CONFIG, VOLUME_KEYRING, VOLUME_DATA}
    clash = sorted(ours & {v.get("name") for v in volumes or []})
    if clash:
        raise _Reject(f"pod already has volume {clash[0]}")

    config_map = _resource_name(annotations, ANNOTATION_CONFIG_MAP, settings.default_config_map)
    keyring_secret = _resource_name(annotations, ANNOTATION_KEYRING_SECRET, settings.default_keyring_secret)

    container_ops: list[dict[str, Any]] = []
    for index, container in enumerate(containers):
        name = container.get("name")
        if not isinstance(name, str) or not name:
            raise _Reject(f"spec.containers[{index}] has no name")
        base = f"/spec/containers/{index}"
        mounts = _list_field(container, "volumeMounts", f"container {name} volumeMounts")
        env = _list_field(container, "env", f"container {name} env")
        if any(not isinstance(m, dict) for m in mounts or []) or any(
            not isinstance(e, dict) for e in env or []
        ):
            raise _Reject(f"container {name} has malformed env or volumeMounts")
        if any(m.get("mountPath", "").rstrip("/") == SOCKET_DIR for m in mounts or []):
            raise _Reject(f"container {name} already mounts {SOCKET_DIR}")
        if any(e.get("name") == SOCKET_ENV for e in env or []):
            warnings.append(f"container {name} already sets {SOCKET_ENV}; left unchanged")
        else:
            container_ops += _append_ops(
                base + "/env", env, [{"name": SOCKET_ENV, "value": "unix://" + SOCKET_PATH}]
            )
        container_ops += _append_ops(
            base + "/volumeMounts",
            mounts,
            [{"name": VOLUME_SOCKET, "mountPath": SOCKET_DIR, "readOnly": True}],
        )

    patch: list[dict[str, Any]] = []
    if init_containers:
        # Prepend: the broker then also serves the pod's other init containers.
        patch.append({"op": "add", "path": "/spec/initContainers/0", "value": _sidecar(settings)})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [_sidecar(settings)]})
    patch += _append_ops("/spec/volumes", volumes, _volumes(config_map, keyring_secret))
    patch += _fs_group_ops(spec, settings, warnings)
    patch += container_ops
    # The inject annotation is present, so metadata.annotations exists: add one key to it.
    patch.append(
        {
            "op": "add",
            "path": "/metadata/annotations/" + _escape(ANNOTATION_STATUS),
            "value": STATUS_INJECTED,
        }
    )
    return patch


def mutate(review: Any, settings: InjectSettings) -> dict[str, Any]:
    """Answer one AdmissionReview v1 request.

    Args:
        review: The decoded JSON body the API server sent (normally an ``AdmissionReview``
            whose ``request.object`` is a Pod). Anything else is tolerated.
        settings: What to inject.

    Returns:
        An ``AdmissionReview`` v1 document whose ``response`` echoes the request ``uid``
        (``""`` if it was absent or invalid) and always has ``allowed: true``. For an
        annotated pod that is not injected yet, ``response.patch`` is a base64-encoded JSON
        patch (``patchType: JSONPatch``). Malformed input yields no patch and a warning.
    """
    warnings: list[str] = []
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    if not isinstance(uid, str):
        uid = ""
    try:
        if not isinstance(review, dict):
            raise _Reject("body is not a JSON object")
        if (review.get("apiVersion"), review.get("kind")) != (
            ADMISSION_API_VERSION,
            ADMISSION_KIND,
        ):
            raise _Reject("not an admission.k8s.io/v1 AdmissionReview")
        if not isinstance(request, dict):
            raise _Reject("AdmissionReview has no request")
        if not uid:
            raise _Reject("AdmissionReview request has no uid")
        kind = request.get("kind")
        if not isinstance(kind, dict) or (
            kind.get("group"),
            kind.get("version"),
            kind.get("kind"),
        ) != ("", "v1", "Pod"):
            raise _Reject("request is not for a v1 Pod")
        if request.get("subResource"):
            return _response(uid, None, warnings)
        if request.get("operation") != "CREATE":
            return _response(uid, None, warnings)
        pod = request.get("object")
        if not isinstance(pod, dict):
            raise _Reject("request has no pod object")
        patch = _pod_patch(pod, settings, warnings)
    except _Reject as exc:
        log.warning("not injecting (uid=%r): %s", uid, exc)
        return _response(uid, None, [f"sidecar not injected: {exc}"])
    except Exception:  # pragma: no cover - defensive: never block pod creation
        log.exception("unexpected error while handling admission request uid=%r", uid)
        return _response(uid, None, ["sidecar not injected: internal error"])
    if patch:
        log.info(
            "injecting credential-broker into pod %s/%s (uid=%s)",
            request.get("namespace", ""),
            request.get("name") or "<generated>",
            uid,
        )
    return _response(uid, patch, warnings)


class _TLSReloader:
    """Keeps an SSL server context and reloads it when the certificate files change.

    cert-manager (or whoever manages the Secret) rotates the certificate in place; the
    kubelet updates the mounted files, and the next connection picks them up.
    """

    def __init__(self, certfile: str, keyfile: str) -> None:
        self._certfile = certfile
        self._keyfile = keyfile
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._context = self._load()

    def _mtimes(self) -> tuple[float, float]:
        return (os.stat(self._certfile).st_mtime, os.stat(self._keyfile).st_mtime)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._certfile, self._keyfile)
        return context

    def context(self) -> ssl.SSLContext:
        """The current context, reloaded first if the files changed (kept if reload fails)."""
        with self._lock:
            try:
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self._context = self._load()
                    self._stamp = stamp
                    log.info("reloaded TLS certificate %s", self._certfile)
            except (OSError, ssl.SSLError):
                log.exception("could not reload TLS certificate; keeping the previous one")
            return self._context


class _WebhookServer(ThreadingHTTPServer):
    """Threading HTTP server that wraps each accepted connection in TLS.

    The handshake happens in the handler thread (``do_handshake_on_connect`` on first I/O),
    so a slow or broken client cannot stall the accept loop.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        settings: InjectSettings,
        tls: _TLSReloader,
        max_body_bytes: int,
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.max_body_bytes = max_body_bytes
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        wrapped = self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("error while handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """``POST /mutate`` -> :func:`mutate`; ``GET /healthz`` -> 200."""

    server: _WebhookServer
    protocol_version = "HTTP/1.1"
    server_version = "credential-broker-injector"
    sys_version = ""
    timeout = 10

    def handle(self) -> None:
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            super().handle()
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection from %s failed: %s", self.client_address, exc)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] in ("/healthz", "/readyz"):
            self._send_text(HTTPStatus.OK, "ok")
        else:
            self._send_text(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mutate":
            self._send_text(HTTPStatus.NOT_FOUND, "not found")
            return
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send_text(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send_text(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return
        if length < 0 or length > self.server.max_body_bytes:
            self.close_connection = True
            self._send_text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
            return
        body = self.rfile.read(length)
        try:
            review: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            review = None  # mutate() answers it with a warning and no patch.
        answer = mutate(review, self.server.settings)
        self._send(
            HTTPStatus.OK,
            json.dumps(answer, separators=(",", ":")).encode("utf-8"),
            "application/json",
        )


def make_server(
    settings: InjectSettings,
    host: str,
    port: int,
    certfile: str,
    keyfile: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> ThreadingHTTPServer:
    """Create (bind, not start) the HTTPS webhook server.

    Args:
        settings: What to inject.
        host: Address to bind (``0.0.0.0`` in a pod, ``127.0.0.1`` in tests).
        port: Port to bind; ``0`` picks a free one (see ``server.server_address``).
        certfile: PEM certificate chain for TLS.
        keyfile: PEM private key for TLS.
        max_body_bytes: Requests with a larger body are refused with HTTP 413.

    Returns:
        The bound server; call ``serve_forever()`` and later ``shutdown()``/``server_close()``.
    """
    return _WebhookServer((host, port), settings, _TLSReloader(certfile, keyfile), max_body_bytes)


def serve(settings: InjectSettings, host: str, port: int, certfile: str, keyfile: str) -> None:
    """Serve ``POST /mutate`` (and ``GET /healthz``) over HTTPS until shut down.

    Blocks. SIGTERM and SIGINT (when called from the main thread) stop it gracefully.
    """
    server = make_server(settings, host, port, certfile, keyfile)
    stopping = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    log.info("credential-broker injector listening on https://%s:%d/mutate", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _parse_listen(value: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port`` for ``--listen``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") if host.startswith("[") else host
    return host or "0.0.0.0", int(port_text)  # noqa: S104 - webhook must reach the API server


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credential-broker inject-webhook",
        description="Mutating admission webhook that injects credential-broker as a native "
        "sidecar into pods annotated credential-broker.io/inject=true.",
    )
    parser.add_argument(
        "--listen",
        type=_parse_listen,
        default="0.0.0.0:8443",
        metavar="HOST:PORT",
        help="address to serve HTTPS on (default: %(default)s)",
    )
    parser.add_argument("--tls-cert", required=True, help="PEM certificate (chain) file")
    parser.add_argument("--tls-key", required=True, help="PEM private key file")
    parser.add_argument("--image", required=True, help="credential-broker image to inject")
    parser.add_argument(
        "--default-config-map",
        default=InjectSettings.default_config_map,
        help="ConfigMap with config.yaml when the pod does not name one (default: %(default)s)",
    )
    parser.add_argument(
        "--default-keyring-secret",
        default=InjectSettings.default_keyring_secret,
        help="Secret with keyring.json when the pod does not name one (default: %(default)s)",
    )
    parser.add_argument(
        "--image-pull-policy",
        choices=["Always", "IfNotPresent", "Never"],
        default=InjectSettings.image_pull_policy,
        help="imagePullPolicy of the injected sidecar (default: %(default)s)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=InjectSettings.health_port,
        help="port of the broker's health-only gRPC listener (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``credential-broker inject-webhook [options]``.

    Args:
        argv: The arguments after the sub-command name (``sys.argv[1:]`` when ``None``).

    Returns:
        The process exit status: 0 after a graceful stop, 2 on bad arguments or TLS files.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    except SystemExit as exc:  # argparse exits on --help and on errors
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 1 <= args.health_port <= 65535:
        parser.print_usage(sys.stderr)
        print("error: --health-port must be between 1 and 65535", file=sys.stderr)
        return 2
    settings = InjectSettings(
        image=args.image,
        default_config_map=args.default_config_map,
        default_keyring_secret=args.default_keyring_secret,
        image_pull_policy=args.image_pull_policy,
        health_port=args.health_port,
    )
    host, port = args.listen
    try:
        serve(settings, host, port, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: cannot serve on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
