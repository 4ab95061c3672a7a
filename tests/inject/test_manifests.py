"""Offline checks of the container image definition and the Kubernetes manifests.

* The Dockerfile is parsed (no Docker engine needed) and checked for the properties the
  image must have: multi-stage, numeric non-root USER, nothing to compile or generate code
  in the final stage, the right ENTRYPOINT/CMD.
* Every raw resource file listed in a kustomization is validated strictly against the
  official Kubernetes JSON schemas of a pinned version, shipped in the ``kubernetes-validate``
  wheel (nothing is downloaded at test time).
* When ``kubectl`` is on PATH, the base, the postgres overlay and the webhook kustomizations
  are rendered with ``kubectl kustomize`` and the output is validated the same way.
* Cross-checks keep the pieces in step: socket path, health port, mounts, uid, CLI flags,
  and the sidecar the webhook injects versus the one in the base.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from broker.inject import webhook

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = {
    "base": DEPLOY,
    "postgres": DEPLOY / "overlays" / "postgres",
    "webhook": DEPLOY / "webhook",
}
UID = 10001
SOCKET_URL = "unix:///var/run/credential-broker/broker.sock"

Validator = Callable[[dict[str, Any]], None]


# =========================================================================== Dockerfile


@dataclass
class Instruction:
    """One Dockerfile instruction: upper-cased keyword and its raw argument text."""

    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON-array (exec) form of the arguments; fails for the shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec form"
        assert all(isinstance(v, str) for v in value)
        return value


@dataclass
class Stage:
    """A build stage: base image (global ARGs substituted), name and instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def _logical_lines(text: str) -> Iterator[str]:
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comments and parser directives; blank lines inside continuations
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        yield current + stripped
        current = ""
    if current.strip():
        yield current.strip()


def parse_dockerfile(path: Path) -> list[Stage]:
    """Parse a Dockerfile into its stages (enough of the syntax for our Dockerfile)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip()
        elif keyword == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            stage_name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=stage_name))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(REPO / "Dockerfile")


def test_dockerfile_is_multi_stage(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    final = stages[-1]
    assert final.base == "python:3.11-slim"
    build_names = {s.name for s in stages[:-1]}
    # The final stage copies only the venv, and only from an earlier stage.
    copies = final.all("COPY")
    assert copies, "final stage copies nothing"
    for copy in copies:
        match = re.fullmatch(r"--from=(\S+)\s+(\S+)\s+(\S+)", copy.args)
        assert match, f"final stage COPY not from a build stage: {copy.args}"
        assert match.group(1) in build_names
        assert (match.group(2), match.group(3)) == ("/opt/venv", "/opt/venv")


def test_build_stage_installs_package_into_venv(stages: list[Stage]) -> None:
    build = " ".join(i.args for s in stages[:-1] for i in s.all("RUN"))
    assert "python -m venv /opt/venv" in build
    # The package itself (".") with the optional parts named by the BROKER_EXTRAS build argument.
    assert '/opt/venv/bin/pip install ".${BROKER_EXTRAS:+[${BROKER_EXTRAS}]}"' in build
    args = " ".join(i.args for s in stages[:-1] for i in s.all("ARG"))
    assert "BROKER_EXTRAS=aws,pkcs11,otel" in args


def test_final_stage_has_no_compilers_or_code_generators(stages: list[Stage]) -> None:
    final = " ".join(f"{i.keyword} {i.args}" for i in stages[-1].instructions).lower()
    for forbidden in (
        "gcc",
        "g++",
        "clang",
        "build-essential",
        "grpcio-tools",
        "grpc_tools",
        "protoc",
        "pip install",
        "apt-get install",
    ):
        assert forbidden not in final, f"final stage mentions {forbidden!r}"


def test_final_stage_runs_as_numeric_non_root_user(stages: list[Stage]) -> None:
    user = stages[-1].last("USER").args
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER must be numeric (uid[:gid]) so runAsNonRoot can verify it: {user}"
    assert int(match.group(1)) == UID
    assert match.group(2) is None or int(match.group(2)) != 0


def test_final_stage_supports_read_only_root_filesystem(stages: list[Stage]) -> None:
    final = stages[-1]
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env)
    volumes: list[str] = []
    for instruction in final.all("VOLUME"):
        volumes += instruction.exec_form()
    assert set(volumes) >= {"/var/lib/credential-broker", "/var/run/credential-broker"}


def test_entrypoint_and_cmd(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.last("ENTRYPOINT").exec_form() == ["credential-broker"]
    assert final.last("CMD").exec_form() == [
        "serve",
        "--config",
        "/etc/credential-broker/config.yaml",
    ]


def test_dockerignore_keeps_the_build_context_small() -> None:
    text = (REPO / ".dockerignore").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines[0] == "*", "allow-list .dockerignore expected"
    assert {"!pyproject.toml", "!broker/"} <= set(lines)


# =========================================================================== manifests


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert all(isinstance(d, dict) for d in docs), path
    return docs


def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = load_yaml_docs(directory / "kustomization.yaml")
    return doc


def raw_resource_files() -> list[Path]:
    """Every resource file (not directory) referenced by one of our kustomizations."""
    files: list[Path] = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        for entry in kustomization(path.parent).get("resources", []):
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path}: missing resource {entry}"
            if target.is_file():
                files.append(target)
    return files


def raw(kind: str, name: str) -> dict[str, Any]:
    for path in raw_resource_files():
        for doc in load_yaml_docs(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind}/{name} in deploy/kubernetes")


def find(docs: list[dict[str, Any]], kind: str, prefix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"expected one {kind} {prefix!r}, got {len(found)}"
    return found[0]


def container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers if c["name"] == name]
    return found


def mount_path(ctr: dict[str, Any], volume: str) -> PurePosixPath:
    (path,) = [m["mountPath"] for m in ctr.get("volumeMounts", []) if m["name"] == volume]
    return PurePosixPath(path)


def is_under(path: str, directory: PurePosixPath) -> bool:
    return PurePosixPath(path).parent == directory or directory in PurePosixPath(path).parents


@pytest.mark.parametrize("path", raw_resource_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_raw_resources_validate_against_kubernetes_schema(path: Path, k8s_validate: Validator) -> None:
    for doc in load_yaml_docs(path):
        k8s_validate(doc)


def test_no_secret_material_is_committed() -> None:
    for path in DEPLOY.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        assert "PRIVATE KEY" not in text, path
        if path.suffix in (".yaml", ".yml"):
            for doc in load_yaml_docs(path):
                assert doc.get("kind") != "Secret", f"{path} defines a Secret"
                assert "secretGenerator" not in doc, f"{path} generates a Secret"


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def _assert_restricted(spec: dict[str, Any]) -> None:
    pod_ctx = spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] == UID
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        ctx = ctr["securityContext"]
        assert ctx["runAsNonRoot"] is True, ctr["name"]
        assert ctx["runAsUser"] == UID, ctr["name"]
        assert ctx["readOnlyRootFilesystem"] is True, ctr["name"]
        assert ctx["allowPrivilegeEscalation"] is False, ctr["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, ctr["name"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, ctr["name"]


def test_workloads_are_restricted() -> None:
    for name in ("example-app", "credential-broker-injector"):
        _assert_restricted(_pod_spec(raw("Deployment", name)))


def test_base_runs_broker_as_native_sidecar() -> None:
    spec = _pod_spec(raw("Deployment", "example-app"))
    sidecar = container(spec["initContainers"], "credential-broker")
    assert sidecar["restartPolicy"] == "Always"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(sidecar[probe]["grpc"]) == {"port"}, probe
    app = container(spec["containers"], "app")
    assert {"name": "CREDENTIAL_BROKER_SOCKET", "value": SOCKET_URL} in app["env"]

    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["credential-broker-socket"]
    assert mount_path(app, "credential-broker-socket") == mount_path(sidecar, "credential-broker-socket")
    assert volumes["credential-broker-config"]["configMap"]["name"] == "credential-broker-config"
    assert volumes["credential-broker-keyring"]["secret"]["secretName"] == ("credential-broker-keyring")
    assert "emptyDir" in volumes["credential-broker-data"]


def _broker_config(directory: Path) -> dict[str, Any]:
    (generator,) = kustomization(directory)["configMapGenerator"]
    assert generator["name"] == "credential-broker-config"
    (entry,) = generator["files"]
    key, _, filename = entry.partition("=")
    assert key == "config.yaml"
    (config,) = load_yaml_docs(directory / filename)
    return config


@pytest.mark.parametrize("variant", ["base", "postgres"])
def test_broker_config_matches_the_pod(variant: str) -> None:
    directory = DEPLOY / "base" if variant == "base" else KUSTOMIZATIONS["postgres"]
    config = _broker_config(directory)
    sidecar = container(_pod_spec(raw("Deployment", "example-app"))["initContainers"], "credential-broker")

    assert config["listen"] == [SOCKET_URL]
    socket_path = SOCKET_URL.removeprefix("unix://")
    assert is_under(socket_path, mount_path(sidecar, "credential-broker-socket"))
    host, _, port = config["health_listen"].rpartition(":")
    assert host == "0.0.0.0"
    assert all(sidecar[p]["grpc"]["port"] == int(port) for p in ("startupProbe", "livenessProbe"))
    assert sidecar["ports"][0]["containerPort"] == int(port)
    assert is_under(config["keyring"]["file"], mount_path(sidecar, "credential-broker-keyring"))
    if variant == "base":
        assert config["store"]["backend"] == "sqlite"
        assert is_under(config["store"]["path"], mount_path(sidecar, "credential-broker-data"))
    else:
        assert config["store"]["backend"] == "postgres"
        assert set(config["store"]) == {"backend", "dsn_file"}, "the DSN must come from a file"
        (patch,) = load_yaml_docs(KUSTOMIZATIONS["postgres"] / "postgres-dsn.yaml")
        pg_sidecar = container(_pod_spec(patch)["initContainers"], "credential-broker")
        assert is_under(config["store"]["dsn_file"], mount_path(pg_sidecar, "credential-broker-postgres"))
        volumes = {v["name"]: v for v in _pod_spec(patch)["volumes"]}
        assert volumes["credential-broker-postgres"]["secret"]["secretName"] == ("credential-broker-postgres")


def test_webhook_injects_the_same_sidecar_as_the_base() -> None:
    """The injected sidecar and the hand-written one in the base must not drift apart."""
    base = _pod_spec(raw("Deployment", "example-app"))
    expected = dict(container(base["initContainers"], "credential-broker"))
    settings = webhook.InjectSettings(image=expected.pop("image"))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"credential-broker.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": pod,
        },
    }
    patch = json.loads(base64.b64decode(webhook.mutate(review, settings)["response"]["patch"]))
    (injected,) = [op["value"][0] for op in patch if op["path"] == "/spec/initContainers"]
    assert injected.pop("image") == settings.image
    assert injected == expected
    (volumes,) = [op["value"] for op in patch if op["path"] == "/spec/volumes"]
    base_volumes = {v["name"]: v for v in base["volumes"]}
    for volume in volumes:
        # Both use a group-only keyring (0440) and an fsGroup (the webhook adds one if missing).
        assert volume == base_volumes[volume["name"]]
    app = container(base["containers"], "app")
    (env,) = [op["value"] for op in patch if op["path"] == "/spec/containers/0/env"]
    (mounts,) = [op["value"] for op in patch if op["path"] == "/spec/containers/0/volumeMounts"]
    assert env == app["env"]
    assert mounts == app["volumeMounts"]


def test_uid_is_the_same_everywhere(stages: list[Stage]) -> None:
    assert stages[-1].last("USER").args.split(":")[0] == str(UID)
    assert webhook.InjectSettings(image="x").run_as_user == UID


def test_mutating_webhook_configuration() -> None:
    config = raw("MutatingWebhookConfiguration", "credential-broker-injector")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    namespaces = {e["key"]: e for e in hook["namespaceSelector"]["matchExpressions"]}
    assert namespaces["credential-broker.io/injection"]["operator"] == "In"
    excluded = namespaces["kubernetes.io/metadata.name"]
    assert excluded["operator"] == "NotIn"
    assert {"kube-system", "credential-broker-system"} <= set(excluded["values"])
    objects = {e["key"]: e for e in hook["objectSelector"]["matchExpressions"]}
    assert objects["app.kubernetes.io/name"] == {
        "key": "app.kubernetes.io/name",
        "operator": "NotIn",
        "values": ["credential-broker-injector"],
    }

    service = raw("Service", "credential-broker-injector")
    client = hook["clientConfig"]["service"]
    assert client["name"] == service["metadata"]["name"]
    assert client["namespace"] == kustomization(KUSTOMIZATIONS["webhook"])["namespace"]
    assert client["path"] == "/mutate"
    (port,) = service["spec"]["ports"]
    assert client["port"] == port["port"]

    injector = container(_pod_spec(raw("Deployment", "credential-broker-injector"))["containers"], "injector")
    assert port["targetPort"] in {p["name"] for p in injector["ports"]}


def test_webhook_deployment_arguments_parse() -> None:
    """The injector's args are accepted by the CLI that `credential-broker inject-webhook` runs."""
    deployment = raw("Deployment", "credential-broker-injector")
    spec = _pod_spec(deployment)
    injector = container(spec["containers"], "injector")
    args = injector["args"]
    assert args[0] == "inject-webhook"
    env = {e["name"]: e["value"] for e in injector.get("env", [])}
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args[1:]]
    parsed = webhook._build_parser().parse_args(expanded)
    tls_dir = mount_path(injector, "tls")
    assert PurePosixPath(parsed.tls_cert).parent == tls_dir
    assert PurePosixPath(parsed.tls_key).parent == tls_dir
    assert parsed.listen[1] == container(spec["containers"], "injector")["ports"][0]["containerPort"]
    assert parsed.default_config_map == "credential-broker-config"
    assert parsed.default_keyring_secret == "credential-broker-keyring"
    probe = injector["readinessProbe"]["httpGet"]
    assert (probe["scheme"], probe["path"]) == ("HTTPS", "/healthz")


# =========================================================================== rendered output


def _renderer() -> list[str] | None:
    """``kubectl kustomize``, else the standalone ``kustomize build`` (scripts/ci/install-tools.sh
    installs it where kubectl is missing), else None."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    gobin = Path(os.environ.get("GOBIN") or Path(os.environ.get("GOPATH") or Path.home() / "go") / "bin")
    kustomize = shutil.which("kustomize") or (
        str(gobin / "kustomize") if (gobin / "kustomize").is_file() else None
    )
    return [kustomize, "build"] if kustomize else None


KUBECTL = _renderer()
# CI sets REQUIRE_KUBECTL=1 so a missing renderer fails instead of skipping.
if KUBECTL is None and os.environ.get("REQUIRE_KUBECTL") == "1":
    raise RuntimeError("REQUIRE_KUBECTL=1 but neither kubectl nor kustomize is installed")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="neither kubectl nor kustomize installed: rendered output not validated"
)


def render(name: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    result = subprocess.run(
        [*KUBECTL, str(KUSTOMIZATIONS[name])],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


@needs_kubectl
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rendered_output_validates(
    name: str, rendered: dict[str, list[dict[str, Any]]], k8s_validate: Validator
) -> None:
    docs = rendered[name]
    assert docs
    for doc in docs:
        k8s_validate(doc)


@needs_kubectl
@pytest.mark.parametrize("name", ["base", "postgres"])
def test_rendered_deployment_references_generated_config_map(
    name: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered[name]
    config_map = find(docs, "ConfigMap", "credential-broker-config")
    spec = _pod_spec(find(docs, "Deployment", "example-app"))
    _assert_restricted(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["credential-broker-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    sidecar = container(spec["initContainers"], "credential-broker")
    assert sidecar["image"] == "registry.example.com/credential-broker:0.1.0"
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    expected_backend = "sqlite" if name == "base" else "postgres"
    assert config["store"]["backend"] == expected_backend
    if name == "postgres":
        assert "credential-broker-data" not in volumes
        assert volumes["credential-broker-postgres"]["secret"]["secretName"] == ("credential-broker-postgres")
        assert is_under(config["store"]["dsn_file"], mount_path(sidecar, "credential-broker-postgres"))


@needs_kubectl
def test_rendered_webhook_injects_its_own_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["webhook"]
    injector = container(_pod_spec(find(docs, "Deployment"))["containers"], "injector")
    env = {e["name"]: e["value"] for e in injector["env"]}
    assert env["SIDECAR_IMAGE"] == injector["image"] == "registry.example.com/credential-broker:0.1.0"
    assert "--image=$(SIDECAR_IMAGE)" in injector["args"]
    namespaced = [d for d in docs if d["kind"] not in ("Namespace", "MutatingWebhookConfiguration")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"credential-broker-system"}
