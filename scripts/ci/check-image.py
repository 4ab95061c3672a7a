#!/usr/bin/env python3
"""Check a built credential-broker image in its unpacked root filesystem (no container runtime).

``buildah run`` needs a container runtime, which this machine lacks, so the image is mounted
with ``buildah mount`` and its entrypoint is run with ``chroot --userspec=10001:10001``, with
the image's own environment. Each property is checked and printed as PASS or FAIL; the exit
status is 1 if any check fails.

Checks:
  * the image config runs as user 10001:10001, and /etc/passwd names uid 10001;
  * no C compiler in the filesystem (gcc, cc, c++, g++, clang, tcc, ... anywhere);
  * no pip: no pip executable, no interpreter in the image can import pip, no pip wheel
    that ensurepip could install, and no pip.conf (the build's settings are not left behind);
  * the entrypoint runs as uid 10001: ``<entrypoint> --version`` prints the package version.

Usage: check-image.py [--version X.Y.Z] [--quiet] IMAGE   (run as root)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

UID = 10001
COMPILER = re.compile(
    r"^(gcc|cc|c\+\+|g\+\+|clang|clang\+\+|tcc|c89|c99|cpp-\d+|gcc-\d+|g\+\+-\d+|clang-\d+)$"
    r"|^[\w.-]+-linux-gnu-(gcc|g\+\+|cc)(-\d+)?$"
)
PIP_NAME = re.compile(r"^pip(3(\.\d+)?)?$")
PIP_WHEEL = re.compile(r"^pip-[\d.]+-.*\.whl$")


class Checks:
    """Collects PASS/FAIL results."""

    def __init__(self, quiet: bool) -> None:
        self.failed: list[str] = []
        self.quiet = quiet

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if not ok:
            self.failed.append(what)
        if not self.quiet:
            print(f"check-image: {'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], check=True, capture_output=True, text=True).stdout.strip()


def walk(root: Path) -> Iterator[Path]:
    """Every path under root, without following symlinks or leaving the filesystem tree."""
    for directory, dirs, files in os.walk(root, followlinks=False):
        rel = Path(directory).relative_to(root)
        if rel.parts[:1] in (("proc",), ("sys",), ("dev",)):
            dirs[:] = []
            continue
        for name in files + dirs:
            yield Path(directory) / name


def run_in_image(root: Path, env: list[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run argv inside the image root as uid/gid 10001 with only the image's environment."""
    return subprocess.run(
        ["chroot", f"--userspec={UID}:{UID}", str(root), "/usr/bin/env", "-i", *env, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def check_image(image: str, version: str | None, checks: Checks) -> None:
    config = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
    user = config.get("User", "")
    checks.check(user in (f"{UID}:{UID}", str(UID)), "image config runs as uid 10001", f"User={user!r}")
    entrypoint = config.get("Entrypoint") or []
    env = config.get("Env") or []
    env = [e for e in env if not e.startswith("HOME=")] + ["HOME=/nonexistent"]

    container = buildah("from", "--quiet", "--pull-never", image)
    try:
        root = Path(buildah("mount", container))
        passwd = (root / "etc/passwd").read_text(encoding="utf-8") if (root / "etc/passwd").exists() else ""
        users = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 6]
        named = [u[0] for u in users if u[2] == str(UID)]
        checks.check(bool(named), "/etc/passwd has uid 10001", ", ".join(named) or "missing")

        compilers: list[str] = []
        pips: list[str] = []
        wheels: list[str] = []
        for path in walk(root):
            name = path.name
            if COMPILER.match(name) and (path.is_symlink() or path.is_file()):
                compilers.append("/" + str(path.relative_to(root)))
            if PIP_NAME.match(name) and (path.is_symlink() or path.is_file()):
                pips.append("/" + str(path.relative_to(root)))
            if PIP_WHEEL.match(name) or name == "pip.conf":
                wheels.append("/" + str(path.relative_to(root)))
        checks.check(not compilers, "no C compiler", ", ".join(compilers) or "none found")
        checks.check(not pips, "no pip executable", ", ".join(pips) or "none found")
        checks.check(not wheels, "no pip wheel or pip.conf", ", ".join(wheels) or "none")

        interpreters = sorted(
            {
                "/" + str(p.relative_to(root))
                for d in ("usr/bin", "usr/local/bin", "opt/venv/bin")
                for p in (root / d).glob("python3*")
                if re.fullmatch(r"python3(\.\d+)?", p.name)
            }
        )
        importable = []
        for interpreter in interpreters:
            result = run_in_image(root, env, [interpreter, "-c", "import pip"])
            if result.returncode == 0:
                importable.append(interpreter)
        checks.check(
            bool(interpreters) and not importable,
            "no interpreter can import pip",
            f"checked {', '.join(interpreters) or 'no interpreter found'}"
            + (f"; importable in {', '.join(importable)}" if importable else ""),
        )

        whoami = run_in_image(root, env, ["/usr/bin/id", "-u"])
        checks.check(
            whoami.stdout.strip() == str(UID),
            "commands run as uid 10001 in the chroot",
            whoami.stdout.strip(),
        )

        if not entrypoint:
            checks.check(False, "entrypoint --version", "the image has no entrypoint")
            return
        result = run_in_image(root, env, [*entrypoint, "--version"])
        out = (result.stdout + result.stderr).strip()
        ok = result.returncode == 0 and (
            version is None or re.search(rf"\b{re.escape(version)}\b", out) is not None
        )
        checks.check(
            ok,
            f"entrypoint {entrypoint} --version runs as uid 10001",
            out[-300:] or f"exit {result.returncode}",
        )
        # The optional parts the Dockerfile builds in (BROKER_EXTRAS): root key sources and tracing.
        python = "/opt/venv/bin/python"  # the Dockerfile's VIRTUAL_ENV
        modules = "boto3, pkcs11, opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc"
        extras = run_in_image(root, env, [python, "-c", f"import {modules}"])
        checks.check(
            extras.returncode == 0,
            "the optional parts import (aws_kms and pkcs11 key sources, OpenTelemetry)",
            (extras.stdout + extras.stderr).strip()[-300:],
        )
    finally:
        subprocess.run(["buildah", "umount", container], capture_output=True, check=False)
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image")
    parser.add_argument("--version", help="the version --version must print")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args()
    checks = Checks(args.quiet)
    try:
        check_image(args.image, args.version, checks)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = (
            exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else str(exc)
        )
        checks.check(False, "image could be inspected and mounted", detail)
    size = subprocess.run(
        ["buildah", "images", "--format", "{{.Size}}", args.image],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if checks.failed:
        print(
            f"check-image: {args.image} ({size}): {len(checks.failed)} check(s) FAILED: {'; '.join(checks.failed)}"
        )
        return 1
    print(f"check-image: {args.image} ({size}): all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
