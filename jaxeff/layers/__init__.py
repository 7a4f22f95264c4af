"""Building blocks of the models: norms, rotary embeddings, token mixers and channel mixers.

Mixers are looked up by name in `jaxeff.layers.registry`; importing this package registers the
built-in ones.
"""

from jaxeff.layers import attention, companion, lightning, mlp, mlstm, moe, s2  # noqa: F401  (registration side effects)
from jaxeff.layers.registry import (CHANNEL_MIXERS, TOKEN_MIXERS, ChannelMixerSpec, TokenMixerSpec,
                                    register_channel_mixer, register_token_mixer)

__all__ = ["CHANNEL_MIXERS", "TOKEN_MIXERS", "ChannelMixerSpec", "TokenMixerSpec", "register_channel_mixer",
           "register_token_mixer"]
