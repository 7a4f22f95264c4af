"""Keys that moved. A user's YAML or override with an old key is refused with the new key's name;
a config saved by an older jaxeff (a workdir's config.yaml, an export's config.json) is migrated.
"""

from __future__ import annotations

import copy
from typing import Any

from jaxeff.config.base import ConfigError

# old dotted key -> new dotted key
MOVED_KEYS: dict[str, str] = {
    "model.lightning_impl": "model.lightning.impl",
    "model.lightning_block_size": "model.lightning.block_size",
    "model.decay_convention": "model.lightning.decay_convention",
    "model.lrpe_layers": "model.lightning.lrpe_layers",
}


def _present(raw: dict[str, Any]) -> list[str]:
    found = []
    for old in MOVED_KEYS:
        node: Any = raw
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            found.append(old)
    return found


def refuse_moved_keys(raw: dict[str, Any]) -> None:
    """ConfigError naming every moved key in a user's config and where it lives now."""
    found = _present(raw)
    if found:
        moves = ", ".join(f"'{old}' is now '{MOVED_KEYS[old]}'" for old in found)
        raise ConfigError(f"renamed config key{'s' if len(found) > 1 else ''}: {moves} (settings of one mixer "
                          "live in its own section); rename it in the YAML file or the override")


def migrate_moved_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved config with old keys moved to their new place (the new key wins if both exist)."""
    raw = copy.deepcopy(raw)
    for old in _present(raw):
        *old_parents, old_name = old.split(".")
        parent = raw
        for part in old_parents:
            parent = parent[part]
        value = parent.pop(old_name)
        *new_parents, new_name = MOVED_KEYS[old].split(".")
        node = raw
        for part in new_parents:
            node = node.setdefault(part, {})
        node.setdefault(new_name, value)
    return raw
