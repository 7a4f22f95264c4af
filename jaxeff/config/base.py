"""What every config section shares: the pydantic base class, the user-error type, and field types.

A section is a pydantic model with strict types and no unknown keys. Field documentation is the
attribute docstring under each field: it becomes the JSON-schema description (editors show it on
hover) and the "meaning" column of docs/config.md.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from jaxeff.errors import ConfigError  # noqa: F401  (re-exported: config code raises it)


class Section(BaseModel):
    """Base of every config section."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, validate_default=True)

    # True for sections whose every setting may change when a run is resumed (see resume.py).
    may_change_on_resume: ClassVar[bool] = False


class MayChangeOnResume:
    """Marker in `Annotated[...]`: this setting may differ between a run and its resumption.

    Only settings that change neither the parameters' shapes nor the data order nor the random
    streams get it; everything else makes `jaxeff train` refuse a workdir saved with another value.
    """

    def __repr__(self) -> str:
        return "MAY_CHANGE"


MAY_CHANGE = MayChangeOnResume()

# YAML 1.1 (PyYAML) reads 3e-4 (no dot) as a string; editors (YAML 1.2) read it as a number.
_FLOAT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _float_from_yaml_string(value: Any) -> Any:
    if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
        return float(value)
    return value


Float = Annotated[float, BeforeValidator(_float_from_yaml_string)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
