"""What the compiler needs to know about Hugging Face causal LMs, and nothing more.

There is no list of accepted families: a model is accepted when its captured graph's attention is what the passes
can prove they lower exactly (``passes/find_attention.py``: SDPA with a causal or sliding-window mask, q/k/v from
linear layers through head-wise ops). This file reads the shapes the compiler needs from the config, refuses the
attention variants a config declares and SDPA cannot express (before any work), and says how to call a model
for capture. The families that are tested are listed in README.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Config fields that declare attention SDPA cannot express (or the passes do not lower); each with its reason.
UNSUPPORTED_ATTENTION = {
    "attn_logit_softcapping": "attention logit soft-capping (tanh of the scores) is not expressible with SDPA",
    "attention_chunk_size": "chunked (block-local) attention layers are not lowered",
}


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of a decoder-only transformer, as its config declares them (0 where the config has no value).

    ``layer_windows``: per layer, the sliding window its config declares (tokens a query sees, itself included),
    0 for a full-attention layer; empty when every layer is full attention.
    """

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    layer_windows: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "layer_windows", tuple(int(w) for w in self.layer_windows))  # lists from JSON

    def window_layers(self, max_seq_len: int) -> list[int]:
        """The layers whose window is shorter than ``max_seq_len``: they run as window layers (sink 0, recent =
        window) whatever the masks say; a window of ``max_seq_len`` or more is full attention for the engine."""
        return [layer for layer, w in enumerate(self.layer_windows) if 0 < w < max_seq_len]


def text_config(model_or_config: Any) -> Any:
    """The config that holds the decoder's attention shape, from a model or a config (multimodal configs nest it)."""
    config = model_or_config
    if not hasattr(config, "num_hidden_layers") and hasattr(config, "config"):
        config = config.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _layer_windows(config: Any, num_layers: int) -> tuple[int, ...]:
    """Per layer, the declared sliding window (0 = full attention). ``layer_types`` names each layer's kind where
    the config has it (Gemma 2/3, Qwen2/3, Ministral, Mistral); without it, a ``sliding_window`` (switched on by
    ``use_sliding_window``, default on) applies to every layer."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return ()
    types = getattr(config, "layer_types", None)
    if types is None:
        return (int(window),) * num_layers
    windows = tuple(int(window) if kind == "sliding_attention" else 0 for kind in types)
    return windows if any(windows) else ()


def read_shape(model_or_config: Any) -> ModelInfo:
    """The one reader of a Hugging Face config: layers, heads, KV heads, head dim, vocabulary, positions and
    per-layer sliding windows.

    Takes a model, its config, or a ModelInfo (returned as is), whatever the family. ValueError when the config
    has no attention shape.
    """
    if isinstance(model_or_config, ModelInfo):
        return model_or_config
    config = text_config(model_or_config)
    try:
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"cannot read the attention shape from {type(model_or_config).__name__}: {exc}") from None
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // num_heads
    return ModelInfo(
        family=getattr(config, "model_type", None) or "",
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        vocab_size=int(getattr(config, "vocab_size", None) or 0),
        max_position_embeddings=int(getattr(config, "max_position_embeddings", None) or 0),
        layer_windows=_layer_windows(config, num_layers),
    )


def check_supported(model: torch.nn.Module, max_seq_len: int) -> ModelInfo:
    """The checks a model's config allows before capture (``check_config``), plus the rotary modules' own types;
    the graph's attention is checked by the passes after capture."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(text_config(config), "num_attention_heads"):
        raise ValueError(
            f"unsupported model {type(model).__name__}: duo_compile lowers Hugging Face causal LMs (a model with a "
            f"config declaring its attention heads)"
        )
    info = check_config(config, max_seq_len, type(model).__name__)
    # The rotary module's own type too: it is what runs, whatever the config was edited to afterwards.
    for module in model.modules():
        _check_rope(getattr(module, "rope_type", None), f"{type(module).__name__}.rope_type", type(model).__name__)
    return info


def check_config(config: Any, max_seq_len: int, name: str | None = None) -> ModelInfo:
    """``check_supported`` for a config alone (the CLI checks a model directory's config.json before it loads
    the weights): attention variants SDPA cannot express (``UNSUPPORTED_ATTENTION``) and dynamic RoPE scaling.
    ``name`` (default: the config's class) names the model in the errors."""
    name = name or type(config).__name__
    info = read_shape(config)
    text = text_config(config)
    for field, reason in UNSUPPORTED_ATTENTION.items():
        value = getattr(text, field, None)
        if value is not None:
            raise ValueError(f"unsupported: {name} has {field}={value!r}: {reason}")
    # transformers 5 names the RoPE dict rope_parameters and keeps rope_scaling as an alias; 4.x and old
    # config.json files have rope_scaling only, sometimes with "type" for "rope_type".
    for attr in ("rope_parameters", "rope_scaling"):
        value = getattr(text, attr, None)
        if isinstance(value, dict):
            for params in _rope_dicts(value):
                rope_type = params.get("rope_type", params.get("type"))
                _check_rope(rope_type, f"{attr}={value!r}", name)
    return info


#: RoPE types that are one fixed function of the positions: they capture as one graph and are tested against the
#: oracle (``longrope`` from transformers 5.21 on, which picks its short or long factors with a ``torch.where``).
TESTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _rope_dicts(value: dict) -> list[dict]:
    """The RoPE parameter dicts in ``value``: itself, or one per layer type (``{"full_attention": {...}, ...}``)."""
    nested = [v for v in value.values() if isinstance(v, dict)]
    return nested if nested and len(nested) == len(value) else [value]


def _check_rope(rope_type: Any, where: str, name: str) -> None:
    """Refuse dynamic RoPE scaling. Hugging Face recomputes its frequencies whenever the longest position grows
    past the cached length (any type whose name contains "dynamic", as transformers' ``dynamic_rope_update``
    decides): a branch on data that one exported graph cannot hold."""
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]  # per-layer-type rotary modules
    for value in types:
        if isinstance(value, str) and "dynamic" in value:
            raise ValueError(
                f"unsupported: dynamic RoPE scaling (rope_type {value!r}, {where}) in {name}: its rotary "
                f"frequencies are recomputed from the sequence length at run time, which one captured graph "
                f"cannot do; duo_compile lowers the RoPE types {', '.join(TESTED_ROPE_TYPES)}"
            )
        if value == "longrope" and longrope_branches_on_length():
            import transformers

            raise ValueError(
                f"unsupported: longrope RoPE scaling with transformers {transformers.__version__} (rope_type "
                f"{value!r}, {where}) in {name}: transformers before 5.21 picks the short or long factors with a "
                f"Python branch on the sequence length, which one captured graph cannot do; upgrade transformers "
                f"to 5.21 or later (it selects them with torch.where)"
            )


def longrope_branches_on_length() -> bool:
    """True for transformers < 5.21, whose longrope update is an ``if`` on ``max(position_ids)`` (5.21 made it
    a ``torch.where``)."""
    import re

    import transformers

    match = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return match is not None and (int(match[1]), int(match[2])) < (5, 21)


class CausalLMForCapture(torch.nn.Module):
    """The calling convention of every captured graph: (input_ids, position_ids) -> logits.

    ``last_logits_only`` keeps only the last position's logits (Hugging Face's ``logits_to_keep=1``): prefill
    then never materialises a [chunk, vocab] logits tensor it would throw away.
    """

    def __init__(self, model: torch.nn.Module, last_logits_only: bool):
        super().__init__()
        self.model = model
        self.logits_to_keep = 1 if last_logits_only else 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=self.logits_to_keep
        )
        return out.logits
