"""Head identification: which KV heads are retrieval heads.

``gated_attention`` mixes full and streaming attention per head inside an unmodified model; ``optimize`` trains
one gate per KV head through it (the paper's method, :func:`identify`); ``passkey`` builds the synthetic
multi-passkey samples both train and evaluate on; ``needle`` is the accuracy study (passkey retrieval by context
length and depth) and its baselines.
"""
from duo_compile.identify.gated_attention import (
    ATTENTION_NAME, AttentionLayout, attention_layout, gated_attention, gated_hidden_states, needle_attention_mass,
    streaming_attention_mask,
)
from duo_compile.identify.optimize import identify

__all__ = [
    "ATTENTION_NAME", "AttentionLayout", "attention_layout", "gated_attention", "gated_hidden_states", "identify",
    "needle_attention_mass", "streaming_attention_mask",
]
