"""``duo_compile.compile``: capture -> passes -> engine."""
from __future__ import annotations

import dataclasses
import itertools
import warnings
import copy

import torch
from torch import fx

from duo_compile.capture import capture
from duo_compile.runtime import engine as runtime
from duo_compile.runtime.engine import Engine, EngineConfig
from duo_compile.masks import HeadMasks, kv_cache_bytes
from duo_compile.models.hf import check_supported, text_config
from duo_compile.parallel import group
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


def capped_window(sink_size: int, recent_size: int, max_seq_len: int) -> tuple[int, int]:
    """The streaming window an engine of ``max_seq_len`` positions needs: ``(sink, recent)`` as asked when
    ``sink + recent <= max_seq_len``, else capped to ``sink + recent == max_seq_len`` (``sink`` kept below
    ``max_seq_len`` so that ``recent >= 1``).

    Same outputs: a query at position ``p < max_seq_len`` of a streaming head sees ``[0, sink) ∪ [p - recent + 1, p]``
    (window mode) or ``[0, sink) ∪ [c(p) - recent, p]`` (chunk mode, ``c(p) <= p``); whenever
    ``sink + recent >= max_seq_len`` both are every key ``0..p``, before and after the cap.
    """
    if sink_size + recent_size <= max_seq_len:
        return sink_size, recent_size
    sink = min(sink_size, max_seq_len - 1)
    return sink, max_seq_len - sink


def _check_weights_present(model: torch.nn.Module) -> None:
    """A parameter or buffer on the meta device has no data (a model built without weights): name the first."""
    meta = [(kind, name) for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers()))
            for name, tensor in named if tensor.is_meta]
    if meta:
        kind, name = meta[0]
        more = f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
        raise ValueError(
            f"model {kind} {name!r} is on the meta device (no data){more}: load the weights before compile "
            f"(from_pretrained, or load_state_dict(..., assign=True) for a model built on meta)"
        )


def _check_cache_fits(info, masks: HeadMasks, config: EngineConfig, dtype: torch.dtype, device) -> None:
    """The KV cache of one sequence of ``max_seq_len`` tokens must fit the device's free memory."""
    free = runtime.free_memory_bytes(device)
    if free is None:
        return
    planned = kv_cache_bytes(info, masks, seq_len=config.max_seq_len, batch_size=1, dtype=dtype,
                             sink_size=config.sink_size, recent_size=config.recent_size).total
    if planned > free:
        raise ValueError(
            f"max_seq_len={config.max_seq_len} needs a KV cache of {planned} bytes ({planned / 2**30:.2f} GiB, "
            f"{dtype}) at batch 1, more than the {free} bytes free on {device} ({free / 2**30:.2f} GiB); pass a "
            f"smaller max_seq_len"
        )


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.untyped_storage().data_ptr()


def _take_ownership(gm: fx.GraphModule, model: torch.nn.Module, device) -> int:
    """Replace every parameter, buffer and tensor attribute of ``gm`` that shares storage with ``model`` by a copy,
    so that the engine owns everything it uses. Tensors the passes already copied (reordered, fused) share nothing
    and are kept; one model tensor used twice (tied weights) becomes one copy. Returns the bytes copied."""
    model_tensors = itertools.chain(
        model.parameters(), model.buffers(),
        (v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)),
    )
    shared = {_storage_key(t) for t in model_tensors if t.untyped_storage().nbytes() > 0}
    slots = []  # (dict holding the tensor, its key there, the tensor)
    for module in gm.modules():
        slots += [(module._parameters, k, t) for k, t in module._parameters.items() if t is not None]
        slots += [(module._buffers, k, t) for k, t in module._buffers.items() if t is not None]
        slots += [(module.__dict__, k, t) for k, t in vars(module).items() if isinstance(t, torch.Tensor)]
    slots = [s for s in slots if s[2].untyped_storage().nbytes() > 0 and _storage_key(s[2]) in shared]

    def view_key(t):
        return _storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype

    to_copy = {view_key(t): t for _, _, t in slots}
    nbytes = sum(t.numel() * t.element_size() for t in to_copy.values())
    free = runtime.free_memory_bytes(device)
    if free is not None and nbytes > free:
        raise torch.OutOfMemoryError(
            f"compile copies {nbytes} bytes of the model's weights into the engine ({nbytes / 2**30:.2f} GiB), more "
            f"than the {free} bytes free on {device} ({free / 2**30:.2f} GiB)"
        )
    with torch.no_grad():
        copies = {key: t.detach().clone() for key, t in to_copy.items()}
    for holder, key, tensor in slots:
        copy = copies[view_key(tensor)]
        holder[key] = torch.nn.Parameter(copy, requires_grad=False) if isinstance(tensor, torch.nn.Parameter) else copy
    return nbytes


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
    check_memory: bool = True,
    tokenizer=None,
    tensor_parallel_size: int = 1,
    tensor_parallel_placement: str = "balanced",
    page_size: int | None = None,
) -> Engine:
    """Compile a Hugging Face causal LM into a DuoAttention engine.

    ``masks``: binary HeadMasks ``[num_layers, num_kv_heads]`` (1 = retrieval head, full KV cache; 0 = streaming
    head, ``sink_size`` first + ``recent_size`` last tokens). ``max_seq_len`` (default: the model's
    ``max_position_embeddings``) sizes the retrieval cache; a larger one than ``max_position_embeddings`` runs
    positions the model was not trained on, with a warning (as Hugging Face gives one). Every argument is checked
    before any work, and the model is not modified.

    Sizes: a streaming cache never holds more than ``max_seq_len`` tokens. Where ``sink_size + recent_size >
    max_seq_len``, a streaming head sees every token of any sequence the engine can run, so ``recent_size`` is
    capped to ``max_seq_len - sink_size`` (and ``sink_size`` to ``max_seq_len - 1`` if it alone reaches
    ``max_seq_len``): the outputs are exactly those of the sizes asked (see ``capped_window``).
    ``engine.config`` holds the sizes the engine runs with (also what an exported engine file records);
    ``engine.requested_config`` the arguments as given. With ``check_memory`` (default) the KV cache of one
    sequence of ``max_seq_len`` tokens (``kv_cache_bytes`` at batch 1) must fit the device's free memory (CUDA:
    ``torch.cuda.mem_get_info`` plus torch's unused cached blocks; CPU: available RAM); pass False only for an
    engine whose caches are always allocated shorter, with ``engine.allocate(batch, max_seq_len)`` (which checks
    its own size).

    Weights: the engine owns copies of everything it uses; it shares no storage with the model. After ``compile``
    the model can be dropped (and its memory freed), and an in-place edit of the model never reaches the engine
    (compile again to take it). Compiling needs memory for the copies while the model is held (up to the
    model's size again: the passes' reordered and fused weights are copies already and are not copied twice).
    ``fuse_projections`` (pass 7): the engine holds each layer's q/k/v and gate/up weights concatenated, one
    matrix multiply each (faster decode); False keeps them as separate (copied) matrices.
    ``tokenizer``: kept as ``engine.tokenizer`` (for text, streamers and ``stop_strings``; engine files carry a
    transformers tokenizer). The model's ``generation_config`` is kept (a copy) as ``engine.generation_config``:
    ``generate``'s defaults, as for ``model.generate``.

    ``tensor_parallel_size=N`` (N > 1): call on every rank of an initialised default process group of N ranks
    (``torchrun --nproc-per-node N``; NCCL on GPUs, gloo on CPU), each with the same model, masks and arguments
    (checked by a digest of each, all-gathered before any work). Each rank's engine holds its share: the KV heads
    (with their query heads) of the balanced placement (``parallel/placement.py``: per layer, retrieval heads
    spread evenly over the ranks), their caches, and ``1/N`` of every MLP; an all-reduce after o_proj and
    down_proj sums the shares. ``engine.info`` and ``engine.masks`` are this rank's (its head counts, its heads'
    masks in the model's order); ``engine.tensor_parallel`` says which heads each rank holds. ``generate`` is
    called on every rank and runs on rank 0's ``input_ids`` / ``attention_mask``, returning the same tokens
    everywhere. ``tensor_parallel_placement="natural"`` splits the heads in the model's order instead (the split
    of implementations that do not place heads; for comparisons).

    ``page_size`` (positions per page): paged retrieval caches, for serving (serve/scheduler.py). Each retrieval
    cache is then one pool of pages shared by all sequences, read and written through a block table (the graph's
    last input, ``block_table``; kernels/paged.py); streaming caches stay one row per sequence. ``generate`` works
    as on any engine (each row gets its own pages); engine files refuse a paged engine.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    masks = as_binary_masks(masks)
    if not isinstance(fuse_projections, bool):
        raise ValueError(f"fuse_projections must be True or False, got {fuse_projections!r}")
    if not isinstance(check_memory, bool):
        raise ValueError(f"check_memory must be True or False, got {check_memory!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer must be a tokenizer (with decode), got {type(tokenizer).__name__}")
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    requested = EngineConfig(sink_size, recent_size, max_seq_len, prefill_chunk_size, streaming_mode, backend,
                             page_size)
    info = check_supported(model, requested.max_seq_len)
    masks.check_shape(info.num_layers, info.num_kv_heads)
    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"model parameters are spread over devices {sorted(map(str, devices))}; use one device")
    _check_weights_present(model)
    device, dtype = devices.pop(), params[0].dtype
    parallel = _check_tensor_parallel(tensor_parallel_size, tensor_parallel_placement, model, masks, info, requested,
                                      fuse_projections, device)
    sink, recent = capped_window(requested.sink_size, requested.recent_size, requested.max_seq_len)
    config = dataclasses.replace(requested, sink_size=sink, recent_size=recent)
    full_masks = masks
    if parallel is not None:  # from here on: this rank's heads
        info, masks = parallel.local_info(info), parallel.local_masks(masks)
    if check_memory:
        _check_cache_fits(info, masks, config, dtype, device)
    if 0 < info.max_position_embeddings < config.max_seq_len:
        warnings.warn(
            f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings="
            f"{info.max_position_embeddings}: positions past it were never trained; depending on the model you may "
            f"see degraded outputs, or nothing at all",
            UserWarning,
            stacklevel=2,
        )

    ctx = PassContext(
        retrieval=full_masks.retrieval,
        sink_size=config.sink_size,
        recent_size=config.recent_size,
        streaming_mode=config.streaming_mode,
        expected_layers=info.num_layers,
        max_seq_len=config.max_seq_len,
        declared_windows=info.layer_windows,
        fuse_projections=fuse_projections,
        tensor_parallel=parallel,
        page_size=config.page_size,
    )
    graph = run_passes(capture(model), ctx)
    _take_ownership(graph, model, device)
    engine = Engine(
        graph,
        ctx.cache_specs,
        config,
        info,
        masks,
        device=device,
        dtype=dtype,
        pass_counts=ctx.changed,
        requested_config=requested,
    )
    engine.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    engine.tokenizer = tokenizer
    engine.tensor_parallel = parallel
    return engine


def _check_tensor_parallel(size, placement, model, masks: HeadMasks, info, requested: EngineConfig,
                           fuse_projections, device):
    """``tensor_parallel_size`` against the process group, the ranks' inputs against each other (one all-gather),
    then the model's shapes against the size; None for 1."""
    if placement not in group.PLACEMENTS:
        raise ValueError(f"tensor_parallel_placement must be one of {tuple(group.PLACEMENTS)}, got {placement!r}")
    size = group.check_group(size, device)
    if size == 1:
        return None
    group.check_same(model=group.model_digest(model), masks=masks.gates.tobytes().hex(),
                     arguments=repr((requested, fuse_projections, placement)))
    group.check_divisible(size, num_attention_heads=info.num_heads, num_key_value_heads=info.num_kv_heads,
                          intermediate_size=getattr(text_config(model), "intermediate_size", 0) or 0)
    return group.TensorParallel.create(size, masks.retrieval, placement)
