"""The Helm chart deploy/helm/credential-broker: helm lint, helm template and strict schema
validation of every rendered object, with default and non-default values.

Besides validity, the rendered objects are checked against what they must agree with: the
kustomize webhook base (every setting it has), the injector's CLI, the broker's own config
validation, and the generated certificates (signed by the CA in the webhook's caBundle, for
the Service's DNS names). Settings that cannot work fail at render time with a clear message.

helm comes from scripts/ci/install-tools.sh. CI (CI=true or REQUIRE_HELM=1) turns a missing
helm or missing cert-manager CRDs into an error instead of a skip.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.config import load_config
from broker.inject import webhook
from tests.brokerproc import ServerProcess, run_cli
from tests.deploy import helmchart
from tests.deploy.helmchart import CHART, render, template, write_values
from tests.inject.conftest import validate_k8s
from tests.pki import TestCA

REQUIRED = os.environ.get("CI", "").lower() == "true" or os.environ.get("REQUIRE_HELM") == "1"
HELM = helmchart.find_helm()
CRDS = helmchart.find_cert_manager_crds()
if REQUIRED and HELM is None:
    raise RuntimeError("CI: helm is not installed (scripts/ci/install-tools.sh builds it into GOBIN)")
if REQUIRED and CRDS is None:
    raise RuntimeError(
        "CI: the cert-manager CRDs are not in the Go module cache (scripts/ci/install-tools.sh)"
    )
pytestmark = [
    pytest.mark.skipif(HELM is None, reason="helm not installed (scripts/ci/install-tools.sh)"),
    pytest.mark.skipif(CRDS is None, reason="cert-manager CRDs not in the Go module cache"),
]

NAMESPACE = "credential-broker-system"
UID = 10001
# A caller token's SHA-256, generated per run (no secret is committed).
TOKEN_SHA256 = os.urandom(32).hex()

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "broker-sqlite-generated-certs": {
        "namespace": {"create": True},
        "image": {"repository": "registry.example.com/cb", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "commonLabels": {"team": "platform"},
        "injector": {
            "replicas": 3,
            "logLevel": "DEBUG",
            "sidecarImage": "registry.example.com/cb-sidecar:1.2.3",
            "sidecarImagePullPolicy": "Always",
            "healthPort": 9086,
            "defaultConfigMap": "cb-config",
            "defaultKeyringSecret": "cb-keyring",
            "webhook": {"failurePolicy": "Fail", "timeoutSeconds": 10, "excludedNamespaces": ["kube-system"]},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"example.com/a": "b"},
        },
        "sidecarConfig": {
            "namespaces": ["shop", "billing"],
            "config": {"log": {"format": "json", "level": "debug"}, "upstreams": []},
        },
        "broker": {
            "enabled": True,
            "metricsPort": 9090,
            "callers": [{"name": "shop", "token_sha256": TOKEN_SHA256, "methods": ["Resolve"]}],
            "store": {
                "sqlite": {"persistence": {"enabled": True, "size": "2Gi", "storageClassName": "fast"}}
            },
            "config": {"log": {"format": "json"}, "read_cache_seconds": 2.0, "upstreams": []},
            "extraVolumes": [{"name": "upstream-secrets", "secret": {"secretName": "upstream-secrets"}}],
            "extraVolumeMounts": [
                {
                    "name": "upstream-secrets",
                    "mountPath": "/etc/credential-broker/upstreams",
                    "readOnly": True,
                }
            ],
            "podDisruptionBudget": {"enabled": True},
        },
    },
    "broker-postgres-cert-manager": {
        "certificates": {"source": "cert-manager"},
        "broker": {
            "enabled": True,
            "replicas": 3,
            "store": {"backend": "postgres", "postgres": {"dsnSecret": "pg-dsn", "poolSize": 20}},
            "tls": {"clientCASecret": "callers-ca"},
            "service": {"type": "LoadBalancer", "port": 443},
        },
    },
    "cert-manager-cluster-issuer": {
        "certificates": {
            "source": "cert-manager",
            "certManager": {
                "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
            },
        },
        "injector": {"podDisruptionBudget": {"enabled": False}, "topologySpread": {"enabled": False}},
    },
    "existing-certificates": {
        "certificates": {"source": "existing"},
        "image": {"digest": "sha256:" + "ab" * 32},
        "injector": {"tls": {"secretName": "my-injector-tls", "caBundle": base64.b64encode(b"CA").decode()}},
        "broker": {
            "enabled": True,
            "tls": {"secretName": "my-broker-tls", "clientCASecret": "callers-ca"},
        },
    },
    "broker-only": {
        "injector": {"enabled": False},
        "broker": {"enabled": True, "tls": {"clientCASecret": "ca"}},
    },
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, values in SCENARIOS.items():
        path = write_values(tmp_path_factory.mktemp(name), values) if values else None
        out[name] = render(path, namespace=NAMESPACE)
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def mount_path(ctr: dict[str, Any], volume: str) -> PurePosixPath:
    (path,) = [m["mountPath"] for m in ctr["volumeMounts"] if m["name"] == volume]
    return PurePosixPath(path)


def is_under(path: str, directory: PurePosixPath) -> bool:
    return directory in PurePosixPath(path).parents


def assert_restricted(spec: dict[str, Any]) -> None:
    pod = spec["securityContext"]
    assert (pod["runAsNonRoot"], pod["runAsUser"], pod["seccompProfile"]) == (
        True,
        UID,
        {"type": "RuntimeDefault"},
    )
    assert spec["automountServiceAccountToken"] is False
    for ctr in spec["containers"]:
        ctx = ctr["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == UID, ctr["name"]
        assert ctx["readOnlyRootFilesystem"] is True, ctr["name"]
        assert ctx["allowPrivilegeEscalation"] is False, ctr["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, ctr["name"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, ctr["name"]


# =========================================================================== lint, validity


def test_helm_lint_default_values() -> None:
    result = helmchart.helm(
        "lint", "--strict", str(CHART), "--kube-version", helmchart.KUBERNETES_VERSION, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "default"])
def test_helm_lint_non_default_values(name: str, tmp_path: Path) -> None:
    values = write_values(tmp_path, SCENARIOS[name])
    result = helmchart.helm(
        "lint",
        "--strict",
        str(CHART),
        "--values",
        str(values),
        "--kube-version",
        helmchart.KUBERNETES_VERSION,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rendered_object_validates(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            helmchart.validate_cert_manager(doc)
        else:
            validate_k8s(doc)
        namespaced = doc["kind"] not in ("Namespace", "MutatingWebhookConfiguration")
        if namespaced and doc["kind"] != "ConfigMap":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "credential-broker"


def test_rendered_objects_per_scenario(rendered: dict[str, list[dict[str, Any]]]) -> None:
    injector = [
        "Deployment",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert kinds(rendered["default"]) == sorted([*injector, "Secret"])
    assert kinds(rendered["broker-sqlite-generated-certs"]) == sorted(
        [
            *injector,
            "Secret",
            "Namespace",
            "ConfigMap",
            "ConfigMap",  # sidecar configs in shop, billing
            "ConfigMap",
            "Deployment",
            "Service",
            "Secret",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
        ]
    )
    # cert-manager: a self-signed Issuer, a CA Certificate, a CA Issuer, one Certificate each.
    assert kinds(rendered["broker-postgres-cert-manager"]) == sorted(
        [
            *injector,
            "Issuer",
            "Certificate",
            "Issuer",
            "Certificate",
            "Certificate",
            "ConfigMap",
            "Deployment",
            "Service",
        ]
    )
    assert kinds(rendered["cert-manager-cluster-issuer"]) == sorted(
        ["Deployment", "MutatingWebhookConfiguration", "Service", "ServiceAccount", "Certificate"]
    )
    assert kinds(rendered["existing-certificates"]) == sorted(
        [*injector, "ConfigMap", "Deployment", "Service"]
    )
    assert kinds(rendered["broker-only"]) == sorted(["ConfigMap", "Deployment", "Service", "Secret"])


# =========================================================================== the injector


def _kustomize_webhook() -> list[dict[str, Any]]:
    from tests.inject.test_manifests import KUBECTL, KUSTOMIZATIONS

    if KUBECTL is None:
        pytest.skip("neither kubectl nor kustomize installed")
    out = subprocess.run(
        [*KUBECTL, str(KUSTOMIZATIONS["webhook"])], check=True, capture_output=True, text=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _without_labels(value: Any) -> Any:
    """Drop label maps and selectors (Helm adds release labels; kustomize has its own)."""
    if isinstance(value, dict):
        return {
            k: _without_labels(v)
            for k, v in value.items()
            if k not in ("labels", "matchLabels", "selector", "labelSelector", "caBundle")
        }
    if isinstance(value, list):
        return [_without_labels(v) for v in value]
    return value


def test_default_injector_has_every_setting_of_the_kustomize_webhook(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """With default values, the chart's injector is the kustomize webhook base, object by
    object, apart from labels, the two added CLI flags that spell out defaults, the TLS
    volume items and the caBundle (the kustomize base leaves it to cert-manager)."""
    chart = {(d["kind"], d["metadata"]["name"]): d for d in rendered["default"]}
    kustomize = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize_webhook()}
    assert set(kustomize) - set(chart) == {("Namespace", NAMESPACE)}  # namespace.create, off by default
    for key, theirs in kustomize.items():
        if key[0] == "Namespace":
            continue
        ours = chart[key]
        if key[0] == "Deployment":
            ours = json.loads(json.dumps(ours))
            injector = container(pod_spec(ours), "injector")
            defaults = {"--image-pull-policy=IfNotPresent", "--health-port=8086", "--log-level=INFO"}
            assert defaults <= set(injector["args"])
            injector["args"] = [a for a in injector["args"] if a not in defaults]
            (tls,) = pod_spec(ours)["volumes"]
            assert tls["secret"].pop("items") == [
                {"key": "tls.crt", "path": "tls.crt"},
                {"key": "tls.key", "path": "tls.key"},
            ]
            # kustomize copies the image into SIDECAR_IMAGE; the chart does the same.
            theirs_env = container(pod_spec(theirs), "injector")["env"]
            assert injector["env"] == theirs_env or injector["env"][0]["value"] == injector["image"]
            injector["env"] = theirs_env
            injector["image"] = container(pod_spec(theirs), "injector")["image"]
        if key[0] == "MutatingWebhookConfiguration":
            ours = json.loads(json.dumps(ours))
            ours["metadata"]["annotations"] = theirs["metadata"]["annotations"]  # cert-manager only
        assert _without_labels(ours) == _without_labels(theirs), key


def test_injector_arguments_parse_and_match_the_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    values = SCENARIOS["broker-sqlite-generated-certs"]["injector"]
    spec = pod_spec(
        find(rendered["broker-sqlite-generated-certs"], "Deployment", "credential-broker-injector")
    )
    assert_restricted(spec)
    injector = container(spec, "injector")
    env = {e["name"]: e["value"] for e in injector["env"]}
    args = injector["args"]
    assert args[0] == "inject-webhook"
    parsed = webhook._build_parser().parse_args(
        [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args[1:]]
    )
    assert parsed.image == values["sidecarImage"]
    assert injector["image"] == "registry.example.com/cb:1.2.3"
    assert injector["imagePullPolicy"] == "Always"
    assert parsed.image_pull_policy == values["sidecarImagePullPolicy"]
    assert parsed.health_port == values["healthPort"]
    assert (parsed.default_config_map, parsed.default_keyring_secret) == ("cb-config", "cb-keyring")
    assert parsed.log_level == "DEBUG"
    assert parsed.listen[1] == injector["ports"][0]["containerPort"]
    tls_dir = mount_path(injector, "tls")
    assert PurePosixPath(parsed.tls_cert).parent == tls_dir == PurePosixPath(parsed.tls_key).parent
    assert (
        find(rendered["broker-sqlite-generated-certs"], "Deployment", "credential-broker-injector")["spec"][
            "replicas"
        ]
        == 3
    )
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["priorityClassName"] == values["priorityClassName"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    hook = find(rendered["broker-sqlite-generated-certs"], "MutatingWebhookConfiguration")["webhooks"][0]
    assert (hook["failurePolicy"], hook["timeoutSeconds"]) == ("Fail", 10)
    excluded = {e["key"]: e for e in hook["namespaceSelector"]["matchExpressions"]}[
        "kubernetes.io/metadata.name"
    ]
    assert excluded["values"] == ["kube-system", NAMESPACE]  # the release namespace is always excluded
    namespace = find(rendered["broker-sqlite-generated-certs"], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _cert(pem_b64: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(pem_b64))


def _verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    key = ca.public_key()
    assert cert.signature_hash_algorithm is not None
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


@pytest.mark.parametrize(
    ("scenario", "secret", "service"),
    [
        ("default", "credential-broker-injector-tls", "credential-broker-injector"),
        ("broker-sqlite-generated-certs", "credential-broker-tls", "credential-broker"),
    ],
)
def test_generated_certificates_are_signed_for_the_service(
    scenario: str, secret: str, service: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    data = find(rendered[scenario], "Secret", secret)["data"]
    ca, cert = _cert(data["ca.crt"]), _cert(data["tls.crt"])
    _verify_signed_by(cert, ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert f"{service}.{NAMESPACE}.svc" in sans
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    # The key in the Secret belongs to the certificate.
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(base64.b64decode(data["tls.key"]), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    if service.endswith("-injector"):
        hook = find(rendered[scenario], "MutatingWebhookConfiguration")["webhooks"][0]
        assert hook["clientConfig"]["caBundle"] == data["ca.crt"]
        assert hook["clientConfig"]["service"] == {
            "name": service,
            "namespace": NAMESPACE,
            "path": "/mutate",
            "port": 443,
        }
        spec = pod_spec(find(rendered[scenario], "Deployment", service))
        assert {v["name"]: v for v in spec["volumes"]}["tls"]["secret"]["secretName"] == secret


def test_cert_manager_issues_the_serving_certificates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["broker-postgres-cert-manager"]
    hook = find(docs, "MutatingWebhookConfiguration")
    assert (
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == f"{NAMESPACE}/credential-broker-injector"
    )
    assert "caBundle" not in hook["webhooks"][0]["clientConfig"]
    ca_issuer = find(docs, "Issuer", "credential-broker-ca")
    ca_cert = find(docs, "Certificate", "credential-broker-ca")
    assert ca_cert["spec"]["isCA"] is True
    assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert find(docs, "Issuer", ca_cert["spec"]["issuerRef"]["name"])["spec"] == {"selfSigned": {}}
    for service, secret in (
        ("credential-broker-injector", "credential-broker-injector-tls"),
        ("credential-broker", "credential-broker-tls"),
    ):
        cert = find(docs, "Certificate", service)
        assert cert["spec"]["secretName"] == secret
        assert f"{service}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
        assert cert["spec"]["issuerRef"]["name"] == "credential-broker-ca"
    assert not [d for d in docs if d["kind"] == "Secret"], "no generated key material with cert-manager"
    (cert,) = [d for d in rendered["cert-manager-cluster-issuer"] if d["kind"] == "Certificate"]
    assert cert["spec"]["issuerRef"] == {
        "name": "corp-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }


def test_existing_certificates_are_referenced(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["existing-certificates"]
    assert not [d for d in docs if d["kind"] in ("Secret", "Certificate")]
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert (
        hook["clientConfig"]["caBundle"] == SCENARIOS["existing-certificates"]["injector"]["tls"]["caBundle"]
    )
    injector = pod_spec(find(docs, "Deployment", "credential-broker-injector"))
    assert {v["name"]: v for v in injector["volumes"]}["tls"]["secret"]["secretName"] == "my-injector-tls"
    broker = find(docs, "Deployment", "credential-broker")
    volumes = {v["name"]: v for v in pod_spec(broker)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-broker-tls"
    image = "registry.example.com/credential-broker@sha256:" + "ab" * 32
    assert (
        container(injector, "injector")["image"]
        == image
        == container(pod_spec(broker), "credential-broker")["image"]
    )


def test_sidecar_config_maps_are_valid_broker_configs(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered["broker-sqlite-generated-certs"]
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cb-config"]
    assert sorted(m["metadata"]["namespace"] for m in maps) == ["billing", "shop"]
    settings = webhook.InjectSettings(image="x", health_port=9086)
    sidecar = webhook._sidecar(settings)
    for config_map in maps:
        document = yaml.safe_load(config_map["data"]["config.yaml"])
        config = load_config(document, environ={}, base_dir=tmp_path)
        assert document["listen"] == ["unix:///var/run/credential-broker/broker.sock"]
        assert is_under(
            document["listen"][0].removeprefix("unix://"), mount_path(sidecar, webhook.VOLUME_SOCKET)
        )
        assert is_under(document["keyring"]["file"], mount_path(sidecar, webhook.VOLUME_KEYRING))
        assert is_under(document["store"]["path"], mount_path(sidecar, webhook.VOLUME_DATA))
        assert config.health_listen == "0.0.0.0:9086"
        assert (config.log.format, config.log.level) == ("json", "debug")


# =========================================================================== the standalone broker


@pytest.mark.parametrize(
    "scenario",
    ["broker-sqlite-generated-certs", "broker-postgres-cert-manager", "existing-certificates", "broker-only"],
)
def test_standalone_broker_config_matches_the_pod(
    scenario: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    docs = rendered[scenario]
    deployment = find(docs, "Deployment", "credential-broker")
    spec = pod_spec(deployment)
    assert_restricted(spec)
    broker = container(spec, "credential-broker")
    assert broker["args"] == ["serve", "--config", "/etc/credential-broker/config.yaml"]
    config_map = find(docs, "ConfigMap", "credential-broker-config")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mount_path(broker, "config") == PurePosixPath("/etc/credential-broker")
    document = yaml.safe_load(config_map["data"]["config.yaml"])
    values = SCENARIOS[scenario]["broker"]

    # The broker accepts it (including its rule that a network listener needs TLS and caller
    # authentication). A postgres DSN file is read at load time: point at a generated one.
    loadable = json.loads(json.dumps(document))
    if loadable["store"]["backend"] == "postgres":
        dsn = tmp_path / "dsn"
        dsn.write_text(f"postgresql://broker:{os.urandom(8).hex()}@db.example.com:5432/broker")
        loadable["store"]["dsn_file"] = str(dsn)
    config = load_config(loadable, environ={}, base_dir=tmp_path)

    (listen,) = document["listen"]
    port = int(listen.rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in broker["ports"]}["grpc"] == port
    service = find(docs, "Service", "credential-broker")
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["targetPort"] == "grpc"
    assert grpc_port["port"] == values.get("service", {}).get("port", 8443)
    health = int(document["health_listen"].rpartition(":")[2])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert broker[probe]["grpc"] == {"port": health}

    assert config.tls is not None
    assert is_under(str(config.tls.cert_file), mount_path(broker, "tls"))
    assert is_under(str(config.tls.key_file), mount_path(broker, "tls"))
    assert volumes["tls"]["secret"]["secretName"] == values.get("tls", {}).get(
        "secretName", "credential-broker-tls"
    )
    if values.get("tls", {}).get("clientCASecret"):
        assert config.tls.client_ca_file is not None
        assert is_under(str(config.tls.client_ca_file), mount_path(broker, "client-ca"))
        assert volumes["client-ca"]["secret"]["secretName"] == values["tls"]["clientCASecret"]
    else:
        assert config.tls.client_ca_file is None
        assert [c.name for c in config.callers] == [c["name"] for c in values["callers"]]
    assert is_under(str(config.keyring.file), mount_path(broker, "keyring"))
    assert volumes["keyring"]["secret"]["secretName"] == "credential-broker-keyring"

    if config.store.backend == "postgres":
        assert is_under(document["store"]["dsn_file"], mount_path(broker, "postgres"))
        assert volumes["postgres"]["secret"]["secretName"] == values["store"]["postgres"]["dsnSecret"]
        assert config.store.pool_size == values["store"]["postgres"]["poolSize"]
        assert "data" not in volumes
        assert deployment["spec"]["replicas"] == values["replicas"]
        assert "strategy" not in deployment["spec"]
    else:
        assert is_under(str(config.store.path), mount_path(broker, "data"))
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        persistence = values.get("store", {}).get("sqlite", {}).get("persistence", {})
        if persistence.get("enabled"):
            claim = find(docs, "PersistentVolumeClaim")
            assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            assert claim["spec"]["resources"]["requests"]["storage"] == persistence["size"]
            assert claim["spec"]["storageClassName"] == persistence["storageClassName"]
        else:
            assert "emptyDir" in volumes["data"]

    if values.get("metricsPort"):
        assert config.metrics.listen == f"0.0.0.0:{values['metricsPort']}"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["metrics"] == values["metricsPort"]
    for mount in values.get("extraVolumeMounts", []):
        assert mount in broker["volumeMounts"]
    for key, value in values.get("config", {}).items():
        assert document[key] == value


def test_config_change_rolls_the_broker_pods(tmp_path: Path) -> None:
    def checksum(read_cache: float) -> str:
        values = {
            "broker": {
                "enabled": True,
                "tls": {"clientCASecret": "ca"},
                "config": {"read_cache_seconds": read_cache},
            }
        }
        docs = render(write_values(tmp_path, values))
        return str(
            find(docs, "Deployment", "credential-broker")["spec"]["template"]["metadata"]["annotations"][
                "checksum/config"
            ]
        )

    assert checksum(1.0) == checksum(1.0)
    assert checksum(1.0) != checksum(2.0)


# =========================================================================== refused settings


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"broker": {"enabled": True}}, "needs caller authentication"),
        (
            {"broker": {"enabled": True, "replicas": 2, "tls": {"clientCASecret": "ca"}}},
            "sqlite allows only broker.replicas=1",
        ),
        (
            {"broker": {"enabled": True, "tls": {"clientCASecret": "ca"}, "config": {"listen": ["x:1"]}}},
            "broker.config",
        ),
        ({"sidecarConfig": {"config": {"store": {"backend": "postgres"}}}}, "sidecarConfig.config"),
        ({"certificates": {"source": "existing"}}, "set injector.tls.secretName"),
        (
            {"certificates": {"source": "existing"}, "injector": {"tls": {"secretName": "t"}}},
            "set injector.tls.caBundle",
        ),
        ({"certificates": {"source": "self-signed"}}, "/certificates/source"),
        ({"injector": {"replicaCount": 2}}, "replicaCount"),
        ({"injector": {"webhook": {"failurePolicy": "Sometimes"}}}, "failurePolicy"),
        ({"broker": {"callers": [{"name": "x", "token_sha256": "not-a-hash"}]}}, "token_sha256"),
        ({"image": {"digest": "latest"}}, "digest"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unworkable_values_are_refused_with_a_clear_message(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    result = template(write_values(tmp_path, values))
    assert result.returncode != 0, f"rendered although it should not: {values}"
    assert message in result.stderr, result.stderr
    assert "goroutine" not in result.stderr


def test_no_key_material_or_secret_is_committed_in_the_chart() -> None:
    for path in CHART.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "PRIVATE KEY" not in text, path
            assert not re.search(r"\b[0-9a-f]{64}\b", text), path


def test_helm_is_the_pinned_version() -> None:
    if shutil.which("go") is None:
        pytest.skip("go not installed: cannot read the module version of the helm binary")
    out = subprocess.run(
        ["go", "version", "-m", str(HELM)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^\s*mod\s+helm\.sh/helm/v3\s+v3\.22\.0\b", out, re.MULTILINE), out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_standalone_broker_serves_with_the_charts_config_and_certificates(tmp_path: Path) -> None:
    """A real broker process runs the chart's rendered config.yaml with the chart-generated
    serving certificate and a caller CA, as the pod would: the file paths are moved under
    tmp_path and the listeners onto loopback, nothing else is changed. A caller with a
    certificate from the caller CA reaches it over TLS, verifying the chart's CA and the
    Service's DNS name; a caller without one is refused."""
    port, health_port = _free_port(), _free_port()
    values = {
        "broker": {"enabled": True, "port": port, "healthPort": health_port, "tls": {"clientCASecret": "ca"}}
    }
    docs = render(write_values(tmp_path, values), namespace=NAMESPACE)
    text = find(docs, "ConfigMap", "credential-broker-config")["data"]["config.yaml"]
    secret = find(docs, "Secret", "credential-broker-tls")["data"]
    root = tmp_path / "pod"
    text = text.replace("/etc/credential-broker/", f"{root}/etc/").replace(
        "/var/lib/credential-broker/", f"{root}/data/"
    )
    text = text.replace("0.0.0.0:", "127.0.0.1:")
    for directory in ("etc/tls", "etc/client-ca", "etc/keyring", "data"):
        (root / directory).mkdir(parents=True, mode=0o700)
    for key in ("tls.crt", "tls.key"):
        (root / "etc/tls" / key).write_bytes(base64.b64decode(secret[key]))
        (root / "etc/tls" / key).chmod(0o600)
    callers_ca = TestCA("callers")
    (root / "etc/client-ca/ca.crt").write_bytes(callers_ca.pem)
    run_cli("keys", "generate", "--output", str(root / "etc/keyring/keyring.json"))
    config = tmp_path / "config.yaml"
    config.write_text(text)

    server = ServerProcess(config, tmp_path / "broker.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

        service_name = f"credential-broker.{NAMESPACE}.svc"
        options = [("grpc.ssl_target_name_override", service_name)]
        chart_ca = base64.b64decode(secret["ca.crt"])
        caller = callers_ca.issue("shop", dns=["shop.example"], server=False)
        creds = grpc.ssl_channel_credentials(chart_ca, caller.key_pem, caller.cert_pem)
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

        anonymous = grpc.ssl_channel_credentials(chart_ca)
        with grpc.secure_channel(f"127.0.0.1:{port}", anonymous, options=options) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
