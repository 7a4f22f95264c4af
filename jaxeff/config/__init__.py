"""Typed run configuration: pydantic sections loaded from YAML plus dotted command-line overrides.

Everything a user can get wrong is checked before JAX compiles anything and reported as a
`ConfigError` whose one-line message names the key and the fix; the CLI turns it into exit code 2.

base.py      the Section base class, ConfigError, field types, the MAY_CHANGE marker
sections.py  Config and its sections (model, data, mesh, train, checkpoint, logging, sample)
mixers.py    one section per mixer family (model.lightning, ...): plain settings
loading.py   YAML + overrides -> Config; saved configs; dump
errors.py    pydantic errors -> one-line messages
legacy.py    keys that moved (refused in user input, migrated in saved configs)
checks.py    cross-field and device checks
resume.py    what may change when a run is resumed
reference.py JSON schema and docs/config.md, generated from the sections
"""

from jaxeff.config.base import ConfigError
from jaxeff.config.checks import check_consistency, validate
from jaxeff.config.loading import config_from_dict, dump_config, load_config, parse_override, read_saved_config
from jaxeff.config.mixers import CompanionConfig, LightningConfig, MlstmConfig, MoeConfig, S2Config
from jaxeff.config.sections import (CheckpointConfig, Config, DataConfig, LoggingConfig, MeshConfig, ModelConfig,
                                    SampleConfig, TrainConfig)

__all__ = [
    "CheckpointConfig", "CompanionConfig", "Config", "ConfigError", "DataConfig", "LightningConfig", "LoggingConfig", "MeshConfig",
    "MlstmConfig", "MoeConfig", "S2Config", "ModelConfig", "SampleConfig", "TrainConfig", "check_consistency", "config_from_dict",
    "dump_config", "load_config", "parse_override", "read_saved_config", "validate",
]
