"""What the compiler needs to know about Hugging Face causal LMs, and nothing more.

The passes work on any graph with SDPA attention; this file only declares which model families are known to
lower correctly, how to read their shapes from the config, and how to call them for capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Families whose attention is plain causal SDPA over RoPE'd q/k with separate q/k/v/o projections. The passes
# would find attention in other families too, but extras (soft-capping, per-layer sliding windows, shared KV)
# would change the semantics silently, so only these are accepted.
SUPPORTED_FAMILIES = {
    "llama": "Llama 2/3 (MHA and GQA)",
    "mistral": "Mistral (sliding_window must be None or >= max_seq_len)",
    "qwen2": "Qwen2 (q/k/v biases)",
}


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of a decoder-only transformer, as its config declares them (0 where the config has no value)."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


def text_config(model_or_config: Any) -> Any:
    """The config that holds the decoder's attention shape, from a model or a config (multimodal configs nest it)."""
    config = model_or_config
    if not hasattr(config, "num_hidden_layers") and hasattr(config, "config"):
        config = config.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def read_shape(model_or_config: Any) -> ModelInfo:
    """The one reader of a Hugging Face config: layers, heads, KV heads, head dim, vocabulary and positions.

    Takes a model, its config, or a ModelInfo (returned as is), whatever the family; ``model_info`` adds the
    check that the family is one the compiler lowers. ValueError when the config has no attention shape.
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
    )


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Read the shapes of a supported Hugging Face causal LM; a clear error for anything else."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if config is None or family not in SUPPORTED_FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={family!r}); duo_compile lowers Hugging Face "
            f"causal LMs of these families: {supported}"
        )
    return read_shape(config)


def check_supported(model: torch.nn.Module, max_seq_len: int) -> ModelInfo:
    """Reject configurations whose attention is not plain causal attention up to ``max_seq_len``."""
    info = model_info(model)
    check_config(model.config, max_seq_len, type(model).__name__)
    # The rotary module's own type too: it is what runs, whatever the config was edited to afterwards.
    for module in model.modules():
        _check_rope(getattr(module, "rope_type", None), f"{type(module).__name__}.rope_type", type(model).__name__)
    return info


def check_config(config: Any, max_seq_len: int, name: str | None = None) -> ModelInfo:
    """``check_supported`` for a config alone (the CLI checks a model directory's config.json before it loads
    the weights): the family, sliding windows shorter than ``max_seq_len``, and dynamic RoPE scaling.
    ``name`` (default: the config's class) names the model in the errors."""
    name = name or type(config).__name__
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_FAMILIES.items())
        raise ValueError(
            f"unsupported model {name} (model_type={family!r}); duo_compile lowers Hugging Face causal LMs of "
            f"these families: {supported}"
        )
    info = read_shape(config)
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window and window < max_seq_len:
        raise ValueError(
            f"{info.family} model uses sliding-window attention of {window} tokens, shorter than "
            f"max_seq_len={max_seq_len}; duo_compile only lowers full causal attention"
        )
    # transformers 5 names the RoPE dict rope_parameters and keeps rope_scaling as an alias; 4.x and old
    # config.json files have rope_scaling only, sometimes with "type" for "rope_type".
    for attr in ("rope_parameters", "rope_scaling"):
        value = getattr(config, attr, None)
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
