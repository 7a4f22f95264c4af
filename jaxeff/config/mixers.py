"""One config section per mixer family: `model.lightning` now; `model.mlstm`, `model.moe`, ... later.

A section's own fields are type- and range-checked whenever a config is loaded, whether or not a
layer uses the mixer. Checks that relate the section to the rest of the config (its layers, the
sequence length) live in `check()` and run only when `model.mixer_pattern` or
`model.channel_mixer_pattern` names one of `mixers` (see `ModelConfig.sections_in_use`).

To add a family: a `Section` subclass here with `mixers = ("name",)`, a field for it on
`ModelConfig`, and its module reads `cfg.<section>.<key>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import Field

from jaxeff.config.base import MAY_CHANGE, ConfigError, PositiveInt, Section

if TYPE_CHECKING:
    from jaxeff.config.sections import Config


class MixerSection(Section):
    # Registered mixer names whose layers read this section.
    mixers: ClassVar[tuple[str, ...]] = ()

    def check(self, cfg: Config, key: str) -> None:
        """Consistency with the rest of the config; called only when a layer uses the mixer."""


class LightningConfig(MixerSection):
    """Lightning attention (TransNormerLLM) token mixers: `model.mixer_pattern: [lightning]`."""

    mixers: ClassVar[tuple[str, ...]] = ("lightning",)

    impl: Annotated[Literal["auto", "reference", "chunked", "pallas"], MAY_CHANGE] = "auto"
    """implementation: `auto` (Pallas on GPU/TPU, chunked on CPU), `reference`, `chunked`, `pallas`"""
    block_size: Annotated[PositiveInt, MAY_CHANGE] = 64
    """sequence block of the chunked / Pallas forms (the Pallas kernels round it up to a power of two)"""
    decay_convention: Literal["code", "paper"] = "code"
    """decay per head and layer: `code` (released TransNormerLLM code, ALiBi slopes) or `paper` (eq. 10); see [models/tnl.md](models/tnl.md)"""
    lrpe_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    """layers whose lightning mixer applies LRPE-d to q and k"""

    def check(self, cfg: Config, key: str) -> None:
        n_layers, seq_len = cfg.model.n_layers, cfg.data.seq_len
        outside = [i for i in self.lrpe_layers if i >= n_layers]
        if outside:
            raise ConfigError(f"{key}.lrpe_layers={self.lrpe_layers}: layers {outside} are outside "
                              f"0..{n_layers - 1} (model.n_layers={n_layers})")
        if self.block_size > seq_len:
            raise ConfigError(f"{key}.block_size={self.block_size} is longer than data.seq_len={seq_len}: the whole "
                              f"sequence would be one quadratic block; set {key}.block_size to at most {seq_len}")
