"""Text for ``credential-broker providers list`` and ``providers show NAME``."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from broker.config import ProviderEntry
from broker.errors import ConfigError
from broker.providers.presets import closest


def list_text(catalogue: Mapping[str, ProviderEntry]) -> str:
    """One line per provider: its name and title, sorted by name."""
    width = max((len(name) for name in catalogue), default=0)
    return "\n".join(f"{name.ljust(width)}  {catalogue[name].title}" for name in sorted(catalogue))


def show_text(catalogue: Mapping[str, ProviderEntry], name: str) -> str:
    """The entry as YAML: what ``provider: NAME`` sets (each key can be overridden in the
    config), the documentation it was written from, and what to set up at the provider."""
    entry = catalogue.get(name)
    if entry is None:
        close = closest(name, sorted(catalogue))
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"unknown provider {name[:64]!r}{hint} (see: credential-broker providers list)")
    document = {
        "provider": name,
        "title": entry.title,
        "docs": list(entry.docs),
        "setup": entry.setup,
        "auth_broker": entry.auth_broker.model_dump(mode="json", exclude_unset=True),
        "you set": ["client_id", "client_secret (or client_secret_file / client_secret_env)", "redirect_uri"],
    }
    return yaml.safe_dump(document, sort_keys=False, width=100).rstrip()
