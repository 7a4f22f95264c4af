"""Building blocks of the models: norms, rotary embeddings, token mixers and channel mixers.

Mixers are looked up by name in `jaxeff.layers.registry`. Importing this package imports every module in it, so a
new mixer is one file here that registers its spec: no list of modules to extend.
"""

import importlib
import pkgutil

from jaxeff.layers.registry import (CHANNEL_MIXERS, TOKEN_MIXERS, ChannelMixerSpec, TokenMixerSpec,
                                    register_channel_mixer, register_token_mixer)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registration side effects

__all__ = ["CHANNEL_MIXERS", "TOKEN_MIXERS", "ChannelMixerSpec", "TokenMixerSpec", "register_channel_mixer",
           "register_token_mixer"]
