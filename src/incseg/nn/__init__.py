"""Building blocks of Continual Attentive Fusion (paper Section III-A) and attentive distillation (III-B).

- :class:`NonLocalProjection`: embedded-Gaussian non-local block (feature projection), identity at init.
- :class:`FeatureFusion`: ``conv_1x1(concat(v_old, v_new))`` back to ``C`` channels.
- :class:`StructuredAttention`: ``(1 + A_CH ⊗ A_SP) * v`` (eq. 1-4), maps exposed for visualisation.
- :class:`ContinualAttentiveFusion`: the whole CAF module with its test-time strategies.
- :class:`SqueezeExcitation` / :class:`ChannelAttention`: AD_CH (eq. 5); :func:`spatial_attention`: AD_SP (eq. 6).
"""

from incseg.functional.attention import spatial_attention
from incseg.nn.caf import ContinualAttentiveFusion, FusionStrategy
from incseg.nn.fusion import FeatureFusion
from incseg.nn.non_local import NonLocalProjection, non_local_attention
from incseg.nn.squeeze_excitation import ChannelAttention, SqueezeExcitation
from incseg.nn.structured_attention import AttentionMaps, StructuredAttention

__all__ = [
    "AttentionMaps",
    "ChannelAttention",
    "ContinualAttentiveFusion",
    "FeatureFusion",
    "FusionStrategy",
    "NonLocalProjection",
    "SqueezeExcitation",
    "StructuredAttention",
    "non_local_attention",
    "spatial_attention",
]
