"""``duo_compile.compile``: capture -> passes -> engine."""
from __future__ import annotations

import copy

import torch

from duo_compile.capture import capture
from duo_compile.runtime.engine import Engine, EngineConfig
from duo_compile.masks import HeadMasks
from duo_compile.models.hf import check_supported
from duo_compile.passes import PassContext, run_passes


def as_binary_masks(masks) -> HeadMasks:
    """Accept HeadMasks or an array of 0/1 gates; anything non-binary must be binarized by the caller."""
    if not isinstance(masks, HeadMasks):
        if isinstance(masks, torch.Tensor):
            masks = masks.detach().cpu().numpy()
        masks = HeadMasks.from_gates(masks)  # validates, naming the bad value (np.asarray would not)
    if not masks.is_binary:
        raise ValueError(
            f"masks are not binary ({masks!r}); call masks.binarize(sparsity=...) or masks.binarize(threshold=...)"
        )
    return masks


def compile(
    model: torch.nn.Module,
    masks,
    *,
    sink_size: int = 64,
    recent_size: int = 256,
    max_seq_len: int | None = None,
    prefill_chunk_size: int | None = None,
    streaming_mode: str = "window",
    backend: str = "inductor",
    fuse_projections: bool = True,
    tokenizer=None,
) -> Engine:
    """Compile a Hugging Face causal LM into a DuoAttention engine.

    ``masks``: binary HeadMasks ``[num_layers, num_kv_heads]`` (1 = retrieval head, full KV cache; 0 = streaming
    head, ``sink_size`` first + ``recent_size`` last tokens). ``max_seq_len`` (default: the model's
    ``max_position_embeddings``) sizes the retrieval cache. Every argument is checked before any work; the model
    is not modified (the engine shares its weights, except the reordered attention projections).
    ``fuse_projections`` (pass 6): the engine holds each layer's q/k/v and gate/up weights concatenated, one
    matrix multiply each (faster decode; while the model is kept too, those weights exist twice: pass False
    to share them instead).
    ``tokenizer``: kept as ``engine.tokenizer`` (for text, streamers and ``stop_strings``; engine files carry a
    transformers tokenizer). The model's ``generation_config`` is kept (a copy) as ``engine.generation_config``:
    ``generate``'s defaults, as for ``model.generate``.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    masks = as_binary_masks(masks)
    if not isinstance(fuse_projections, bool):
        raise ValueError(f"fuse_projections must be True or False, got {fuse_projections!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer must be a tokenizer (with decode), got {type(tokenizer).__name__}")
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    config = EngineConfig(sink_size, recent_size, max_seq_len, prefill_chunk_size, streaming_mode, backend)
    info = check_supported(model, config.max_seq_len)
    masks.check_shape(info.num_layers, info.num_kv_heads)
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"model parameters are spread over devices {sorted(map(str, devices))}; use one device")

    ctx = PassContext(
        retrieval=masks.retrieval,
        sink_size=config.sink_size,
        recent_size=config.recent_size,
        streaming_mode=config.streaming_mode,
        expected_layers=info.num_layers,
        fuse_projections=fuse_projections,
    )
    graph = run_passes(capture(model), ctx)
    engine = Engine(
        graph,
        ctx.cache_specs,
        config,
        info,
        masks,
        device=devices.pop(),
        dtype=params[0].dtype,
        pass_counts=ctx.changed,
    )
    engine.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    engine.tokenizer = tokenizer
    return engine
