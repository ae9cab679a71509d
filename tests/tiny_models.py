"""Tiny random-weight Hugging Face causal LMs for tests: Llama, Mistral and Qwen2 (q/k/v biases), MHA or GQA.

Three layers so that one mask can hold a layer of only retrieval heads, a mixed layer and a layer of only
streaming heads (see ``mixed_gates``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "mistral", "qwen2")
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_config(arch: str = "llama", gqa: bool = True, num_layers: int = 3, vocab_size: int = 96):
    config_cls, _ = _CLASSES[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(arch: str = "llama", gqa: bool = True, num_layers: int = 3, seed: int = 0, dtype=torch.float32,
               biases: bool = False):
    """A tiny random model in eval mode. Weights are scaled up so attention is far from uniform (masks matter).
    ``biases`` (Llama): a bias on every projection (``attention_bias`` and ``mlp_bias``), random like Qwen2's."""
    torch.manual_seed(seed)
    _, model_cls = _CLASSES[arch]
    config = tiny_config(arch, gqa, num_layers)
    if biases:
        config.attention_bias = config.mlp_bias = True
    model = model_cls(config).eval().to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    # Random weights have no end of text: without an eos id in the model's generation config, generate (the model's
    # and an engine's, which takes it as its defaults) runs to max_new_tokens, as the oracle does. Tests that stop
    # at an eos id pass one.
    model.generation_config.eos_token_id = None
    return model


def mixed_gates(num_layers: int, num_kv_heads: int) -> np.ndarray:
    """Binary gates: layer 0 all retrieval, last layer all streaming, others alternate starting with streaming."""
    gates = np.zeros((num_layers, num_kv_heads))
    gates[0] = 1.0
    for layer in range(1, num_layers - 1):
        gates[layer, 1::2] = 1.0
    return gates


@functools.lru_cache(maxsize=None)
def cached_tiny_model(arch: str, gqa: bool):
    """``tiny_model(arch, gqa)``, built once per test process (tests must not modify it)."""
    return tiny_model(arch, gqa)


def mixed_masks(model):
    """The ``mixed_gates`` pattern of a 3-layer tiny model as HeadMasks."""
    import duo_compile

    return duo_compile.HeadMasks.from_gates(mixed_gates(3, model.config.num_key_value_heads))


@functools.lru_cache(maxsize=None)
def cached_engine(arch: str, gqa: bool, mode: str, backend: str, sink: int, recent: int, max_len: int):
    """An engine of ``cached_tiny_model(arch, gqa)`` with ``mixed_masks``, compiled once per test process."""
    import duo_compile

    model = cached_tiny_model(arch, gqa)
    return duo_compile.compile(model, mixed_masks(model), sink_size=sink, recent_size=recent, max_seq_len=max_len,
                               streaming_mode=mode, backend=backend)


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face's rotary tables (base 10000) for ``positions`` ``[rows, T]``: cos and sin ``[rows, 1, T,
    head_dim]`` with duplicated halves, unsqueezed over heads, as ``apply_rotary_pos_emb`` receives them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()
