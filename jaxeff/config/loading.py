"""Reading configs: a YAML file plus dotted command-line overrides -> a checked `Config`.

Every failure is a one-line `ConfigError` (the CLI prints it and exits with code 2).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from jaxeff.config.base import ConfigError
from jaxeff.config.errors import config_error, unknown_key_error
from jaxeff.config.legacy import migrate_moved_keys, refuse_moved_keys
from jaxeff.config.sections import Config
from jaxeff.paths import PathLike, as_path, write_text_atomically


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=100' -> ('train.steps', 100). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (for example train.steps=100)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': '{key}' is not a dotted key like train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({getattr(e, 'problem', e)})") from None
    return key, value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty `section:` in the YAML file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i + 1])}' is a setting, not a section")
    node[parts[-1]] = value


def read_yaml(path: PathLike) -> dict[str, Any]:
    path = as_path(path, "--config")
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file (e.g. configs/debug.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (pass --config PATH, e.g. configs/debug.yaml)")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)")
    return loaded or {}


def _normalise(raw: dict[str, Any], section: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Refuse keys that are not names (YAML `1: 2`); `train:` with nothing under it means the defaults."""
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise unknown_key_error(section, f"{prefix}{key}")
        field = section.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            value = {} if value is None else _normalise(value, sub, f"{prefix}{key}.") if isinstance(value, dict) else value
        out[key] = value
    return out


def config_from_dict(raw: dict[str, Any], where: str = "") -> Config:
    """Validate a nested dict (the YAML form). `where` prefixes messages (e.g. the file it came from)."""
    try:
        return Config.model_validate(_normalise(raw, Config))
    except ValidationError as e:
        raise config_error(e, Config, where) from None


def load_config(path: PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, check types. Raises ConfigError."""
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    refuse_moved_keys(raw)
    return config_from_dict(raw)


def read_saved_config(path: PathLike) -> Config:
    """A config written by `dump_config`, possibly by an older jaxeff (old keys are migrated)."""
    raw = read_yaml(path)
    if not raw:  # an empty file would validate as the defaults: another run
        raise ConfigError(f"the saved config '{path}' is empty")
    raw = migrate_moved_keys(raw)
    return config_from_dict(raw, where=f"{path}: ")


def dump_config(cfg: Config, path: PathLike) -> None:
    write_text_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
