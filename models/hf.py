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
    config = model.config
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window and window < max_seq_len:
        raise ValueError(
            f"{info.family} model uses sliding-window attention of {window} tokens, shorter than "
            f"max_seq_len={max_seq_len}; duo_compile only lowers full causal attention"
        )
    return info


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
