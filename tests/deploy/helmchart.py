"""Find helm and the cert-manager CRDs, render the chart, and validate what it renders.

helm is built from its Go module by scripts/ci/install-tools.sh (into GOBIN), which also puts
the cert-manager Go module, whose deploy/crds hold the CRDs of Certificate and Issuer, in the
Go module cache. Kubernetes objects are validated strictly against the pinned official
schemas (tests/inject/conftest.py); cert-manager objects against the openAPIV3Schema of their
CRD, made strict the same way (unknown fields are errors).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "credential-broker"
KUBERNETES_VERSION = "1.31.0"
CERT_MANAGER_VERSION = "v1.16.2"  # as in scripts/ci/install-tools.sh
CERT_MANAGER_KINDS = {"Certificate": "crd-certificates.yaml", "Issuer": "crd-issuers.yaml"}


def _gobin() -> Path:
    gobin = os.environ.get("GOBIN")
    if gobin:
        return Path(gobin)
    return Path(os.environ.get("GOPATH") or Path.home() / "go") / "bin"


def find_helm() -> str | None:
    """helm on PATH, else in GOBIN (where install-tools.sh builds it), else None."""
    found = shutil.which("helm")
    if found:
        return found
    candidate = _gobin() / "helm"
    return str(candidate) if candidate.is_file() else None


def _go_mod_cache() -> Path:
    if os.environ.get("GOMODCACHE"):
        return Path(os.environ["GOMODCACHE"])
    go = shutil.which("go")
    if go:
        out = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    return Path(os.environ.get("GOPATH") or Path.home() / "go") / "pkg" / "mod"


def find_cert_manager_crds() -> Path | None:
    """The cert-manager module's deploy/crds in the Go module cache, or None."""
    crds = (
        _go_mod_cache()
        / "github.com"
        / "cert-manager"
        / f"cert-manager@{CERT_MANAGER_VERSION}"
        / "deploy"
        / "crds"
    )
    return crds if all((crds / f).is_file() for f in CERT_MANAGER_KINDS.values()) else None


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    binary = find_helm()
    assert binary is not None
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
        # No repositories, no plugins, no cache from the user's home.
        env={**os.environ, "HELM_CONFIG_HOME": "/nonexistent", "HELM_DATA_HOME": "/nonexistent"},
    )


def write_values(directory: Path, values: dict[str, Any]) -> Path:
    path = directory / "values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def template(
    values_file: Path | None,
    *,
    release: str = "credential-broker",
    namespace: str = "credential-broker-system",
) -> subprocess.CompletedProcess[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", KUBERNETES_VERSION]
    if values_file is not None:
        args += ["--values", str(values_file)]
    return helm(*args, check=False)


def render(values_file: Path | None, **kwargs: str) -> list[dict[str, Any]]:
    result = template(values_file, **kwargs)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _strict(schema: Any) -> Any:
    """Make an OpenAPI v3 object schema reject unknown fields, as the API server does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    crds = find_cert_manager_crds()
    assert crds is not None
    (crd,) = [d for d in yaml.safe_load_all((crds / CERT_MANAGER_KINDS[kind]).read_text()) if d]
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    # metadata is checked by the API server's own rules, not the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    schema = _strict(schema)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_class(schema)


def validate_cert_manager(doc: dict[str, Any]) -> None:
    """Validate a cert-manager.io/v1 object against its CRD schema; raise on the first error."""
    assert doc["apiVersion"] == "cert-manager.io/v1", doc["apiVersion"]
    errors = sorted(_crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {errors[0].message} at {where}")
