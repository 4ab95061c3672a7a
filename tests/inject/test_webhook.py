"""Tests for the sidecar-injecting mutating admission webhook (broker.inject.webhook)."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from broker.crypto import keyfile
from broker.inject import webhook
from broker.inject.webhook import InjectSettings, mutate

from .conftest import write_self_signed_cert

IMAGE = "registry.example.com/credential-broker:0.1.0"
SETTINGS = InjectSettings(image=IMAGE)
UID = "705ab4f5-6393-11e8-b7cc-42010a800002"

Validator = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- documents


def make_pod() -> dict[str, Any]:
    """A pod as the API server hands it to mutating webhooks for a Deployment's ReplicaSet.

    The ServiceAccount admission plugin has already added the projected token volume.
    """
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-7d9c8b6f5-",
            "namespace": "shop",
            "labels": {"app": "orders", "pod-template-hash": "7d9c8b6f5"},
            "annotations": {"credential-broker.io/inject": "true"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "orders-7d9c8b6f5",
                    "uid": "4c0e6fa8-1a1b-4ad0-9d1b-2b5f0e0b1a11",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "orders",
                    "image": "registry.example.com/orders:1.4.2",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-x7k2p",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "orders",
            "serviceAccount": "orders",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "volumes": [
                {
                    "name": "kube-api-access-x7k2p",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                        "defaultMode": 420,
                    },
                }
            ],
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }


def make_review(pod: Any, *, operation: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview v1 request, as the API server POSTs it."""
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "a1b2c3d4-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


EXPECTED_SIDECAR: dict[str, Any] = {
    "name": "credential-broker",
    "image": IMAGE,
    "imagePullPolicy": "IfNotPresent",
    "args": ["serve", "--config", "/etc/credential-broker/config.yaml"],
    "restartPolicy": "Always",
    "ports": [{"name": "cb-health", "containerPort": 8086, "protocol": "TCP"}],
    "startupProbe": {"grpc": {"port": 8086}, "periodSeconds": 1, "failureThreshold": 30},
    "livenessProbe": {"grpc": {"port": 8086}, "periodSeconds": 10, "failureThreshold": 3},
    "readinessProbe": {"grpc": {"port": 8086}, "periodSeconds": 5, "failureThreshold": 3},
    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "volumeMounts": [
        {"name": "credential-broker-socket", "mountPath": "/var/run/credential-broker"},
        {
            "name": "credential-broker-config",
            "mountPath": "/etc/credential-broker",
            "readOnly": True,
        },
        {
            "name": "credential-broker-keyring",
            "mountPath": "/etc/credential-broker/keyring",
            "readOnly": True,
        },
        {"name": "credential-broker-data", "mountPath": "/var/lib/credential-broker"},
    ],
}


def expected_volumes(config_map: str, secret: str) -> list[dict[str, Any]]:
    return [
        {"name": "credential-broker-socket", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": "credential-broker-config",
            "configMap": {
                "name": config_map,
                "items": [{"key": "config.yaml", "path": "config.yaml"}],
            },
        },
        {"name": "credential-broker-keyring", "secret": {"secretName": secret, "defaultMode": 0o440}},
        {"name": "credential-broker-data", "emptyDir": {}},
    ]


SOCKET_ENV = {
    "name": "CREDENTIAL_BROKER_SOCKET",
    "value": "unix:///var/run/credential-broker/broker.sock",
}
SOCKET_MOUNT = {
    "name": "credential-broker-socket",
    "mountPath": "/var/run/credential-broker",
    "readOnly": True,
}


# --------------------------------------------------------------------------- helpers


def assert_well_formed(answer: dict[str, Any], uid: str = UID) -> dict[str, Any]:
    """Check the AdmissionReview response envelope and return ``response``."""
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response: dict[str, Any] = answer["response"]
    assert response["uid"] == uid
    assert response["allowed"] is True
    assert set(response) <= {"uid", "allowed", "patchType", "patch", "warnings"}
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
    else:
        assert "patchType" not in response
    for warning in response.get("warnings", []):
        assert isinstance(warning, str)
    return response


def decode_patch(answer: dict[str, Any]) -> list[dict[str, Any]]:
    response = assert_well_formed(answer)
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(patch, list)
    return patch


def apply(pod: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """Apply the returned RFC 6902 patch with the independent ``jsonpatch`` implementation."""
    result = jsonpatch.apply_patch(pod, decode_patch(answer), in_place=False)
    assert isinstance(result, dict)
    return result


def assert_unchanged(answer: dict[str, Any], *, uid: str = UID, warned: bool) -> None:
    response = assert_well_formed(answer, uid)
    assert "patch" not in response
    assert bool(response.get("warnings")) is warned


# --------------------------------------------------------------------------- mutate()


def test_injects_native_sidecar_into_annotated_pod(k8s_validate: Validator) -> None:
    pod = make_pod()
    original = copy.deepcopy(pod)
    answer = mutate(make_review(pod), SETTINGS)

    assert pod == original, "mutate() must not modify its input"
    assert answer["response"]["warnings"] == [
        webhook.WARNING_PREFIX
        + "spec.securityContext.fsGroup set to 10001 so the sidecar can read its keyring"
    ]
    patched = apply(pod, answer)

    expected = copy.deepcopy(original)
    expected["spec"]["securityContext"] = {"fsGroup": 10001}
    expected["metadata"]["annotations"]["credential-broker.io/status"] = "injected"
    expected["spec"]["initContainers"] = [EXPECTED_SIDECAR]
    expected["spec"]["volumes"] += expected_volumes("credential-broker-config", "credential-broker-keyring")
    app = expected["spec"]["containers"][0]
    app["env"].append(SOCKET_ENV)
    app["volumeMounts"].append(SOCKET_MOUNT)
    assert patched == expected
    k8s_validate(patched)


@pytest.mark.parametrize(
    "pod_fs_group",
    [None, "no fsGroup", 3000],
    ids=["no securityContext", "securityContext without fsGroup", "the pod's own fsGroup"],
)
def test_the_sidecar_can_read_its_keyring_and_the_broker_accepts_its_mode(
    pod_fs_group: int | str | None, k8s_validate: Validator
) -> None:
    """The broker refuses a keyring others can read, so the injected Secret volume must give
    the sidecar (uid 10001) a group-only file. What the kubelet does with a Secret volume: files
    owned by root, group the pod's fsGroup (root without one), mode defaultMode (0644 when unset);
    fsGroup is also a supplementary group of every container in the pod."""
    pod = make_pod()
    if pod_fs_group is not None:
        pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    if isinstance(pod_fs_group, int):
        pod["spec"]["securityContext"]["fsGroup"] = pod_fs_group
    patched = apply(pod, mutate(make_review(pod), SETTINGS))
    k8s_validate(patched)
    fs_group = patched["spec"].get("securityContext", {}).get("fsGroup")
    (volume,) = [v for v in patched["spec"]["volumes"] if v["name"] == webhook.VOLUME_KEYRING]
    mode = volume["secret"].get("defaultMode", 0o644)
    (sidecar,) = [c for c in patched["spec"]["initContainers"] if c["name"] == webhook.SIDECAR_NAME]
    uid, gid = sidecar["securityContext"]["runAsUser"], sidecar["securityContext"]["runAsGroup"]
    groups = {gid} | ({fs_group} if fs_group is not None else set())
    file_group = fs_group if fs_group is not None else 0
    assert mode & 0o004 or (mode & 0o040 and file_group in groups), "the sidecar cannot read its keyring"
    assert keyfile.exposure(stat.S_IFREG | mode, 0, uid) is None, "the broker would refuse its keyring"
    if isinstance(pod_fs_group, int):
        assert fs_group == pod_fs_group  # the pod's own fsGroup is kept
    if pod_fs_group is not None:
        assert patched["spec"]["securityContext"]["runAsNonRoot"] is True  # the rest is kept


def test_patch_escapes_slash_in_annotation_key() -> None:
    patch = decode_patch(mutate(make_review(make_pod()), SETTINGS))
    paths = [op["path"] for op in patch]
    assert "/metadata/annotations/credential-broker.io~1status" in paths
    # Appends into the existing arrays use "/-"; absent arrays are added whole.
    assert "/spec/volumes/-" in paths
    assert "/spec/containers/0/env/-" in paths
    assert "/spec/initContainers" in paths


def test_bare_pod_without_optional_arrays(k8s_validate: Validator) -> None:
    """No initContainers, volumes, env or volumeMounts: whole arrays are added."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare", "annotations": {"credential-broker.io/inject": "true"}},
        "spec": {
            "containers": [
                {"name": "a", "image": "example/a:1"},
                {"name": "b", "image": "example/b:1"},
            ]
        },
    }
    answer = mutate(make_review(pod), SETTINGS)
    patch = decode_patch(answer)
    assert not any(op["path"].endswith("/-") for op in patch)
    patched = apply(pod, answer)
    assert patched["spec"]["initContainers"] == [EXPECTED_SIDECAR]
    assert patched["spec"]["volumes"] == expected_volumes(
        "credential-broker-config", "credential-broker-keyring"
    )
    for container in patched["spec"]["containers"]:
        assert container["env"] == [SOCKET_ENV]
        assert container["volumeMounts"] == [SOCKET_MOUNT]
    assert patched["metadata"]["annotations"] == {
        "credential-broker.io/inject": "true",
        "credential-broker.io/status": "injected",
    }
    k8s_validate(patched)


def test_empty_arrays_are_replaced_whole() -> None:
    pod = make_pod()
    pod["spec"]["initContainers"] = []
    pod["spec"]["volumes"] = []
    pod["spec"]["containers"][0]["env"] = []
    pod["spec"]["containers"][0]["volumeMounts"] = []
    patched = apply(pod, mutate(make_review(pod), SETTINGS))
    assert patched["spec"]["initContainers"] == [EXPECTED_SIDECAR]
    assert len(patched["spec"]["volumes"]) == 4
    assert patched["spec"]["containers"][0]["env"] == [SOCKET_ENV]


def test_sidecar_is_prepended_to_existing_init_containers(k8s_validate: Validator) -> None:
    pod = make_pod()
    migrate = {"name": "migrate", "image": "registry.example.com/orders:1.4.2", "args": ["migrate"]}
    pod["spec"]["initContainers"] = [migrate]
    patched = apply(pod, mutate(make_review(pod), SETTINGS))
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [
        "credential-broker",
        "migrate",
    ]
    # Only app containers get the socket; regular init containers are left as they were.
    assert patched["spec"]["initContainers"][1] == migrate
    k8s_validate(patched)


def test_annotations_choose_config_map_and_keyring_secret() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"]["credential-broker.io/config-map"] = "orders-broker-config"
    pod["metadata"]["annotations"]["credential-broker.io/keyring-secret"] = "orders-keyring"
    patched = apply(pod, mutate(make_review(pod), SETTINGS))
    assert patched["spec"]["volumes"][1:] == expected_volumes("orders-broker-config", "orders-keyring")


def test_settings_defaults_are_used() -> None:
    settings = InjectSettings(
        image="example/cb:2",
        default_config_map="cb-config",
        default_keyring_secret="cb-keyring",
        image_pull_policy="Always",
        health_port=9443,
    )
    patched = apply(make_pod(), mutate(make_review(make_pod()), settings))
    sidecar = patched["spec"]["initContainers"][0]
    assert sidecar["image"] == "example/cb:2"
    assert sidecar["imagePullPolicy"] == "Always"
    assert sidecar["startupProbe"]["grpc"] == {"port": 9443}
    assert sidecar["ports"][0]["containerPort"] == 9443
    assert patched["spec"]["volumes"][1:] == expected_volumes("cb-config", "cb-keyring")


def test_inject_annotation_is_case_insensitive() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"]["credential-broker.io/inject"] = "True"
    assert "patch" in mutate(make_review(pod), SETTINGS)["response"]


def test_idempotent_on_already_patched_pod() -> None:
    once = apply(make_pod(), mutate(make_review(make_pod()), SETTINGS))
    assert_unchanged(mutate(make_review(once), SETTINGS), warned=False)


def test_status_annotation_alone_means_injected() -> None:
    pod = make_pod()
    pod["metadata"]["annotations"]["credential-broker.io/status"] = "injected"
    assert_unchanged(mutate(make_review(pod), SETTINGS), warned=False)


def test_existing_sidecar_init_container_means_injected() -> None:
    pod = make_pod()
    pod["spec"]["initContainers"] = [{"name": "credential-broker", "image": "example/cb:1"}]
    assert_unchanged(mutate(make_review(pod), SETTINGS), warned=False)


@pytest.mark.parametrize("value", [None, "false", "no", ""])
def test_pod_not_annotated_is_untouched(value: str | None) -> None:
    pod = make_pod()
    if value is None:
        del pod["metadata"]["annotations"]
    else:
        pod["metadata"]["annotations"]["credential-broker.io/inject"] = value
    assert_unchanged(mutate(make_review(pod), SETTINGS), warned=False)


def test_pod_without_metadata_is_untouched() -> None:
    pod = make_pod()
    del pod["metadata"]
    assert_unchanged(mutate(make_review(pod), SETTINGS), warned=False)


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_only_create_is_mutated(operation: str) -> None:
    assert_unchanged(mutate(make_review(make_pod(), operation=operation), SETTINGS), warned=False)


def test_existing_socket_env_is_kept_with_warning() -> None:
    pod = make_pod()
    mine = {"name": "CREDENTIAL_BROKER_SOCKET", "value": "unix:///elsewhere.sock"}
    pod["spec"]["containers"][0]["env"].append(mine)
    answer = mutate(make_review(pod), SETTINGS)
    assert answer["response"]["warnings"]
    patched = apply(pod, answer)
    env = patched["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "CREDENTIAL_BROKER_SOCKET"] == [mine]
    assert SOCKET_MOUNT in patched["spec"]["containers"][0]["volumeMounts"]


def _malformed_reviews() -> Iterator[Any]:
    yield pytest.param(None, id="null-body")
    yield pytest.param([], id="array-body")
    yield pytest.param("AdmissionReview", id="string-body")
    yield pytest.param({}, id="empty-object")
    review = make_review(make_pod())
    review["apiVersion"] = "admission.k8s.io/v1beta1"
    yield pytest.param(review, id="v1beta1")
    review = make_review(make_pod())
    review["kind"] = "Pod"
    yield pytest.param(review, id="wrong-kind")
    review = make_review(make_pod())
    review["request"] = "nope"
    yield pytest.param(review, id="request-not-object")
    review = make_review(make_pod())
    review["request"]["kind"] = {"group": "", "version": "v1", "kind": "Service"}
    yield pytest.param(review, id="not-a-pod")
    review = make_review(make_pod())
    review["request"]["kind"] = "Pod"
    yield pytest.param(review, id="kind-not-object")
    yield pytest.param(make_review(None), id="object-null")
    yield pytest.param(make_review(["pod"]), id="object-array")

    def broken(mutator: Callable[[dict[str, Any]], None], name: str) -> Any:
        pod = make_pod()
        mutator(pod)
        return pytest.param(make_review(pod), id=name)

    yield broken(lambda p: p.__setitem__("metadata", "x"), "metadata-not-object")
    yield broken(lambda p: p["metadata"].__setitem__("annotations", ["x"]), "annotations-list")
    yield broken(lambda p: p.__delitem__("spec"), "no-spec")
    yield broken(lambda p: p["spec"].__setitem__("containers", {}), "containers-object")
    yield broken(lambda p: p["spec"].__setitem__("containers", []), "containers-empty")
    yield broken(lambda p: p["spec"].__setitem__("containers", [1]), "container-not-object")
    yield broken(lambda p: p["spec"]["containers"][0].__delitem__("name"), "container-no-name")
    yield broken(lambda p: p["spec"]["containers"][0].__setitem__("env", "x"), "env-string")
    yield broken(lambda p: p["spec"]["containers"][0].__setitem__("env", [None]), "env-item-null")
    yield broken(lambda p: p["spec"]["containers"][0].__setitem__("volumeMounts", 3), "mounts-number")
    yield broken(lambda p: p["spec"].__setitem__("volumes", "x"), "volumes-string")
    yield broken(lambda p: p["spec"].__setitem__("volumes", ["x"]), "volume-not-object")
    yield broken(lambda p: p["spec"].__setitem__("initContainers", {}), "init-object")
    yield broken(lambda p: p["spec"].__setitem__("initContainers", [7]), "init-item-number")
    yield broken(
        lambda p: p["metadata"]["annotations"].__setitem__("credential-broker.io/config-map", "Not_A_Name"),
        "bad-config-map-name",
    )
    yield broken(
        lambda p: p["metadata"]["annotations"].__setitem__("credential-broker.io/keyring-secret", "x" * 254),
        "keyring-name-too-long",
    )
    yield broken(
        lambda p: p["spec"]["volumes"].append({"name": "credential-broker-data", "emptyDir": {}}),
        "volume-name-clash",
    )
    yield broken(
        lambda p: p["spec"]["containers"][0]["volumeMounts"].append(
            {"name": "x", "mountPath": "/var/run/credential-broker/"}
        ),
        "mount-path-clash",
    )
    yield broken(
        lambda p: p["spec"]["containers"][0]["volumeMounts"].append({"name": "x", "mountPath": 5}),
        "mount-path-number",
    )
    yield broken(
        lambda p: p["spec"]["containers"].append({"name": "credential-broker", "image": "x"}),
        "app-container-named-like-sidecar",
    )


@pytest.mark.parametrize("review", list(_malformed_reviews()))
def test_malformed_input_fails_safe(review: Any) -> None:
    answer = mutate(review, SETTINGS)
    uid = UID if isinstance(review, dict) and isinstance(review.get("request"), dict) else ""
    assert_unchanged(answer, uid=uid, warned=True)
    json.dumps(answer)  # serialisable as is


@pytest.mark.parametrize("uid", [None, 42, ""], ids=["absent", "number", "empty"])
def test_bad_uid_still_gets_well_formed_response(uid: Any) -> None:
    review = make_review(make_pod())
    if uid is None:
        del review["request"]["uid"]
    else:
        review["request"]["uid"] = uid
    assert_unchanged(mutate(review, SETTINGS), uid="", warned=True)


def test_patched_pods_validate_against_kubernetes_schema(k8s_validate: Validator) -> None:
    """Every successful injection of the fixtures above yields a schema-valid pod."""
    pods = [make_pod()]
    bare = make_pod()
    for key in ("volumes",):
        del bare["spec"][key]
    del bare["spec"]["containers"][0]["env"]
    del bare["spec"]["containers"][0]["volumeMounts"]
    pods.append(bare)
    for pod in pods:
        k8s_validate(pod)
        k8s_validate(apply(pod, mutate(make_review(pod), SETTINGS)))


# --------------------------------------------------------------------------- HTTPS server


@pytest.fixture
def server(tls_files: tuple[Path, Path]) -> Iterator[tuple[str, int]]:
    cert, key = tls_files
    httpd = webhook.make_server(SETTINGS, "127.0.0.1", 0, str(cert), str(key), max_body_bytes=65536)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield str(host), int(port)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _request(
    address: tuple[str, int],
    cafile: Path,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str]:
    context = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection(address[0], address[1], context=context, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type", "")
    finally:
        conn.close()


def test_https_post_mutate(server: tuple[str, int], tls_files: tuple[Path, Path]) -> None:
    pod = make_pod()
    body = json.dumps(make_review(pod)).encode()
    status, data, content_type = _request(
        server, tls_files[0], "POST", "/mutate", body, {"Content-Type": "application/json"}
    )
    assert status == 200
    assert content_type == "application/json"
    answer = json.loads(data)
    patched = apply(pod, answer)
    assert patched["spec"]["initContainers"][0]["name"] == "credential-broker"
    assert answer == mutate(make_review(pod), SETTINGS)


def test_https_malformed_body_is_allowed(server: tuple[str, int], tls_files: tuple[Path, Path]) -> None:
    status, data, _ = _request(server, tls_files[0], "POST", "/mutate", b"{not json")
    assert status == 200
    assert_unchanged(json.loads(data), uid="", warned=True)


def test_https_body_cap(server: tuple[str, int], tls_files: tuple[Path, Path]) -> None:
    # The server answers from the Content-Length header alone, before reading any body.
    headers = {"Content-Length": "65537"}
    status, _, _ = _request(server, tls_files[0], "POST", "/mutate", b"{}", headers)
    assert status == 413
    status, _, _ = _request(server, tls_files[0], "POST", "/mutate", b"{}", {"Content-Length": "x"})
    assert status == 411


def test_https_healthz_and_unknown_paths(server: tuple[str, int], tls_files: tuple[Path, Path]) -> None:
    assert _request(server, tls_files[0], "GET", "/healthz")[0] == 200
    assert _request(server, tls_files[0], "GET", "/mutate")[0] == 404
    assert _request(server, tls_files[0], "POST", "/other", b"{}")[0] == 404


def test_https_rejects_plain_http_and_keeps_serving(
    server: tuple[str, int], tls_files: tuple[Path, Path]
) -> None:
    conn = http.client.HTTPConnection(*server, timeout=5)
    try:
        conn.request("GET", "/healthz")
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.getresponse().read()
    finally:
        conn.close()
    assert _request(server, tls_files[0], "GET", "/healthz")[0] == 200


def _peer_cert(address: tuple[str, int]) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def test_https_reloads_rotated_certificate(tmp_path: Path) -> None:
    cert, key = write_self_signed_cert(tmp_path, "first")
    httpd = webhook.make_server(SETTINGS, "127.0.0.1", 0, str(cert), str(key))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        address = (str(httpd.server_address[0]), int(httpd.server_address[1]))
        first = _peer_cert(address)
        write_self_signed_cert(tmp_path, "second")
        later = time.time() + 10  # make sure the mtimes differ on coarse clocks
        os.utime(cert, (later, later))
        os.utime(key, (later, later))
        second = _peer_cert(address)
        assert second != first
        assert second == ssl.PEM_cert_to_DER_cert(cert.read_text())
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- main()


def test_main_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert webhook.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--listen",
        "--tls-cert",
        "--tls-key",
        "--image",
        "--default-config-map",
        "--default-keyring-secret",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--tls-cert", "c", "--tls-key", "k"],
        ["--listen", "nope", "--tls-cert", "c", "--tls-key", "k", "--image", "i"],
        ["--listen", "1.2.3.4:99999", "--tls-cert", "c", "--tls-key", "k", "--image", "i"],
    ],
)
def test_main_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert webhook.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_main_reports_missing_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        str(tmp_path / "missing.crt"),
        "--tls-key",
        str(tmp_path / "missing.key"),
        "--image",
        IMAGE,
    ]
    assert webhook.main(argv) == 2
    assert "missing.crt" in capsys.readouterr().err
