"""The provider catalogue as data: read it, merge a preset under a config, suggest a name.

Validation is broker.config's (``ProviderEntry``), so the catalogue, a ``providers_file`` and an
upstream's own keys all obey one schema. This module reads YAML and merges plain mappings only.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from broker.errors import ConfigError

#: ``auth_broker`` keys whose value is a mapping merged key by key (config over preset).
MAPPING_KEYS = frozenset(
    {
        "authorization_params",
        "token_params",
        "refresh_params",
        "token_response",
        "connection_params",
        "connection_fields",
    }
)


def builtin_entries() -> dict[str, Any]:
    """The catalogue shipped in the package, parsed but not yet validated."""
    text = resources.files(__package__).joinpath("catalogue.yaml").read_text(encoding="utf-8")
    return _entries(yaml.safe_load(text), "the built-in provider catalogue")


def read_entries(path: Path) -> dict[str, Any]:
    """A ``providers_file``: a mapping of provider name to entry, parsed but not yet validated."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"providers_file: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"providers_file: {path} is not valid YAML{where}") from None
    return _entries(document, f"providers_file {path}")


def _entries(document: object, where: str) -> dict[str, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("providers"), dict):
        raise ConfigError(f"{where}: must be a mapping with a 'providers' mapping of name to entry")
    return {str(name): entry for name, entry in document["providers"].items()}


def merge(preset: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` over ``preset``: each key the config sets wins. For the mapping knobs the
    two mappings merge key by key, and a key the config sets to null drops the preset's."""
    out = dict(preset)
    for key, value in config.items():
        prior = out.get(key)
        if key in MAPPING_KEYS and isinstance(prior, dict) and isinstance(value, dict):
            combined = {**prior, **value}
            # token_response: null means "do not read"; elsewhere null drops the parameter.
            if key != "token_response":
                combined = {k: v for k, v in combined.items() if v is not None}
            out[key] = combined
        else:
            out[key] = value
    return out


def closest(name: str, names: Sequence[str]) -> str | None:
    """The known provider name closest to ``name``, if one is close enough to be a typo."""
    found = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    return found[0] if found else None
