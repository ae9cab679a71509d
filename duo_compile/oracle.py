"""The eager oracle: the unmodified Hugging Face model with dense per-head DuoAttention masks.

Every compiler test compares against this, so it shares no code with the compiler (nothing from
``duo_compile.kernels`` or ``duo_compile.passes``): the visibility rule of docs/design.md "Semantics"
is written out here again, as dense boolean ``[query, key]`` matrices, and applied by a plain-PyTorch fp32
attention function registered with transformers' ``AttentionInterface``.

Rule, for a query at absolute position ``p`` and a key at ``j <= p``:

- retrieval head: visible (causal).
- streaming head, ``"window"`` mode (default, token-exact): visible iff ``j < sink_size`` or
  ``j >= p - recent_size + 1``.
- streaming head, ``"chunk"`` mode (the authors' chunked prefill): visible iff ``j < sink_size`` or
  ``j >= c(p) - recent_size``, where ``c(p)`` is the first position of the chunk ``p`` was processed in:
  prompt token ``p`` has ``c(p) = (p // prefill_chunk_size) * prefill_chunk_size`` (``None`` = the whole prompt
  is one chunk, so ``c(p) = 0``); a generated token is its own chunk, ``c(p) = p``.

Under GQA, query head ``h`` uses KV head ``h // (H_q / H_kv)`` and takes its mask.

Sliding-window layers (read from the config here again: ``layer_types`` entries ``"sliding_attention"`` with
``sliding_window = W``, or, without ``layer_types``, every layer when ``sliding_window`` is set and
``use_sliding_window`` is not off: Mistral, Qwen2/3, Ministral, Gemma 3's local layers) keep the model's own rule for
every head, whatever the masks say: key ``j`` is visible to query ``p`` iff ``p - W < j <= p``. The masks apply to
the other layers. Given the engine's ``max_seq_len``, a layer whose window is at least that long is a
full-attention layer whose masks apply (the window hides no key from any query such an engine can run). A layer
whose module passes a different ``sliding_window`` to the attention function is an error.

The model is switched to the oracle's attention only inside a context manager that always restores every
config's attention implementation (``try``/``finally``); the oracle checks that every decoder layer actually
went through it, so a model that bypasses the attention interface is an error, not a silent full-attention run.
Tested against transformers 5.17 and 5.24: both route attention through
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` and skip building a mask for an
implementation that has no entry in ``ALL_MASK_ATTENTION_FUNCTIONS`` (the oracle builds its own).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "ATTENTION_NAME",
    "STREAMING_MODES",
    "as_retrieval",
    "streaming_visibility",
    "causal_visibility",
    "layer_visibility",
    "oracle_attention",
    "oracle_logits",
    "oracle_generate",
]

#: Name under which the oracle's attention function is registered with transformers.
ATTENTION_NAME = "duo_oracle"
STREAMING_MODES = ("window", "chunk")


# --------------------------------------------------------------------------------------------------------------
# The rule, as dense masks
# --------------------------------------------------------------------------------------------------------------
def _check_rule_args(
    sink_size: int,
    recent_size: int,
    streaming_mode: str,
    prefill_chunk_size: int | None,
) -> None:
    if streaming_mode not in STREAMING_MODES:
        raise ValueError(f"streaming_mode must be one of {STREAMING_MODES}, got {streaming_mode!r}")
    if isinstance(sink_size, bool) or not isinstance(sink_size, (int, np.integer)) or sink_size < 0:
        raise ValueError(f"sink_size must be an integer >= 0, got {sink_size!r}")
    if isinstance(recent_size, bool) or not isinstance(recent_size, (int, np.integer)) or recent_size < 1:
        raise ValueError(f"recent_size must be an integer >= 1, got {recent_size!r}")
    if prefill_chunk_size is not None and (
        isinstance(prefill_chunk_size, bool)
        or not isinstance(prefill_chunk_size, (int, np.integer))
        or prefill_chunk_size < 1
    ):
        raise ValueError(f"prefill_chunk_size must be None or an integer >= 1, got {prefill_chunk_size!r}")


def _check_max_seq_len(max_seq_len: int | None, length: int) -> None:
    """``max_seq_len`` is None or an integer that holds ``length`` tokens (the rule is the engine's, which runs no
    longer sequence)."""
    if max_seq_len is None:
        return
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be an integer >= 1 or None, got {max_seq_len!r}")
    if length > max_seq_len:
        raise ValueError(f"{length} tokens do not fit max_seq_len={max_seq_len}")


def causal_visibility(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[seq_len, seq_len]`` bool, ``[p, j]`` true iff key ``j`` is visible to query ``p`` for a retrieval head."""
    pos = torch.arange(seq_len, device=device)
    return pos[None, :] <= pos[:, None]


def streaming_visibility(
    seq_len: int,
    *,
    sink_size: int,
    recent_size: int,
    streaming_mode: str = "window",
    prefill_chunk_size: int | None = None,
    prompt_length: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[seq_len, seq_len]`` bool, ``[p, j]`` true iff key ``j`` is visible to query ``p`` for a streaming head.

    Positions are absolute, starting at 0. ``prompt_length`` (default ``seq_len``) is where the prompt ends; it only
    matters in ``"chunk"`` mode, where every token from ``prompt_length`` on is a generated token (its own chunk).
    """
    _check_rule_args(sink_size, recent_size, streaming_mode, prefill_chunk_size)
    if prompt_length is None:
        prompt_length = seq_len
    if not 0 <= prompt_length <= seq_len:
        raise ValueError(f"prompt_length must be in [0, {seq_len}] (the sequence length), got {prompt_length!r}")
    pos = torch.arange(seq_len, device=device)
    p, j = pos[:, None], pos[None, :]
    if streaming_mode == "window":
        recent_start = p - recent_size + 1
    else:
        chunk = prefill_chunk_size if prefill_chunk_size is not None else max(prompt_length, 1)
        chunk_start = torch.where(p < prompt_length, (p // chunk) * chunk, p)
        recent_start = chunk_start - recent_size
    return (j <= p) & ((j < sink_size) | (j >= recent_start))


def as_retrieval(retrieval: Any) -> np.ndarray:
    """The ``[layers, kv_heads]`` bool array from a bool array/tensor, a 0/1 array, or an object with ``.retrieval``.

    ``.retrieval`` duck-types ``duo_compile.masks.HeadMasks`` without importing it. Numeric arrays are accepted only
    when every value is exactly 0 or 1 (binarize gates first).
    """
    if hasattr(retrieval, "retrieval") and not isinstance(retrieval, (np.ndarray, torch.Tensor)):
        retrieval = retrieval.retrieval
    if isinstance(retrieval, torch.Tensor):
        retrieval = retrieval.detach().cpu().numpy()
    try:
        arr = np.asarray(retrieval)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"retrieval must be a bool array [layers, kv_heads], got {type(retrieval).__name__}") from exc
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"retrieval must be a bool array (or exactly 0/1 values) [layers, kv_heads]; got dtype {arr.dtype} "
                f"with values {np.unique(arr)[:8].tolist()} (binarize the gates first)"
            )
        arr = arr.astype(bool)
    if arr.ndim != 2:
        raise ValueError(f"retrieval must be 2-D [layers, kv_heads], got shape {tuple(arr.shape)}")
    return arr


def layer_visibility(
    retrieval_row: Sequence[bool] | np.ndarray | torch.Tensor,
    seq_len: int,
    *,
    sink_size: int,
    recent_size: int,
    streaming_mode: str = "window",
    prefill_chunk_size: int | None = None,
    prompt_length: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[kv_heads, seq_len, seq_len]`` bool: causal rows for retrieval KV heads, the streaming rule for the rest."""
    row = torch.as_tensor(np.asarray(retrieval_row, dtype=bool), device=device)
    causal = causal_visibility(seq_len, device)
    streaming = streaming_visibility(
        seq_len,
        sink_size=sink_size,
        recent_size=recent_size,
        streaming_mode=streaming_mode,
        prefill_chunk_size=prefill_chunk_size,
        prompt_length=prompt_length,
        device=device,
    )
    return torch.where(row[:, None, None], causal[None], streaming[None])


# --------------------------------------------------------------------------------------------------------------
# The attention function and the context that installs it
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _OracleState:
    masks: torch.Tensor  # [layers, kv_heads, T, T] bool
    windows: list[int]  # per layer, the config's sliding window (0: full attention)
    calls: list[int]  # attention calls seen per layer in the current forward


_ACTIVE: contextvars.ContextVar[_OracleState | None] = contextvars.ContextVar("duo_oracle_state", default=None)


def oracle_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention function: fp32 softmax attention under the active dense per-head masks.

    query ``[B, H_q, T, D]``, key/value ``[B, H_kv, S, D]`` (not repeated for GQA); returns ``[B, T, H_q, D]`` and the
    attention probabilities. ``attention_mask`` is ignored: the oracle builds its own causal-and-streaming mask, and no
    padding is supported. ``dropout`` is ignored (the oracle is deterministic inference).
    """
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} called outside duo_compile.oracle (no masks are active)"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; the oracle cannot tell which layer's masks to use")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"layer {layer}: attention logit softcapping / sink logits are not supported")
    masks = state.masks
    if not 0 <= layer < masks.shape[0]:
        raise RuntimeError(f"layer_idx {layer} out of range for retrieval masks of {masks.shape[0]} layers")
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    if q_len != masks.shape[-2] or kv_len != masks.shape[-1]:
        raise RuntimeError(
            f"layer {layer}: query/key lengths {q_len}/{kv_len} do not match the oracle's {masks.shape[-1]} tokens "
            "(the oracle runs one full forward without a KV cache)"
        )
    if num_kv_heads != masks.shape[1] or num_q_heads % num_kv_heads:
        raise RuntimeError(
            f"layer {layer}: {num_q_heads} query heads / {num_kv_heads} KV heads do not fit retrieval masks with "
            f"{masks.shape[1]} KV heads"
        )
    groups = num_q_heads // num_kv_heads
    visible = masks[layer].to(query.device).repeat_interleave(groups, dim=0)  # [H_q, T, S]
    passed = kwargs.get("sliding_window")
    if passed is not None and int(passed) != state.windows[layer]:
        raise RuntimeError(f"layer {layer}: the module passes sliding_window={passed} but the config declares "
                           f"{state.windows[layer] or 'full attention'} for this layer")
    scale = head_dim**-0.5 if scaling is None else scaling
    q = query.float()
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)
    state.calls[layer] += 1
    return out.to(query.dtype).transpose(1, 2).contiguous(), probs.to(query.dtype)


def _register() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError as exc:  # pragma: no cover - depends on the installed transformers
        raise ImportError(
            "duo_compile.oracle needs transformers >= 5.17 (transformers.AttentionInterface not found)"
        ) from exc
    if not hasattr(AttentionInterface, "register"):  # pragma: no cover
        raise ImportError("transformers.AttentionInterface has no register(); need transformers >= 5.17")
    AttentionInterface.register(ATTENTION_NAME, oracle_attention)


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every distinct config object the model's modules read ``_attn_implementation`` from (with sub-configs)."""
    seen: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return list(seen.values())


def _get_impl(cfg: Any) -> Any:
    return cfg.__dict__["_attn_implementation_internal"] if "_attn_implementation_internal" in cfg.__dict__ else (
        cfg._attn_implementation
    )


def _set_impl(cfg: Any, value: Any) -> None:
    # Write the plain attribute behind the property so nothing recurses into sub-configs: each config is restored
    # to exactly what it held.
    if "_attn_implementation_internal" in cfg.__dict__:
        cfg.__dict__["_attn_implementation_internal"] = value
    else:
        cfg._attn_implementation = value


@contextlib.contextmanager
def _oracle_attention_installed(model: torch.nn.Module, masks: torch.Tensor,
                                windows: list[int]) -> Iterator[_OracleState]:
    """Route the model's attention through ``oracle_attention`` with ``masks``; always restore the model."""
    _register()
    configs = _configs(model)
    if not configs:
        raise TypeError(f"{type(model).__name__} has no transformers config; the oracle needs a Hugging Face model")
    saved = [(cfg, _get_impl(cfg)) for cfg in configs]
    state = _OracleState(masks=masks, windows=windows, calls=[0] * masks.shape[0])
    token = _ACTIVE.set(state)
    try:
        for cfg in configs:
            _set_impl(cfg, ATTENTION_NAME)
        yield state
    finally:
        for cfg, value in saved:
            _set_impl(cfg, value)
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------
def _model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """Layers and KV heads, read here again rather than through the compiler's reader (the oracle shares no code
    with the compiler)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; the oracle needs a Hugging Face causal LM")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_hidden_layers), int(num_kv_heads)


def _windows(model: torch.nn.Module) -> list[int]:
    """Per layer, the sliding window the model's config declares (0: full attention), read here again."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [0] * layers
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * layers
    return [int(window) if kind == "sliding_attention" else 0 for kind in kinds]


def _window_visibility(seq_len: int, window: int, device) -> torch.Tensor:
    """``[seq_len, seq_len]`` bool: the model's sliding window, ``p - window < j <= p``."""
    pos = torch.arange(seq_len, device=device)
    p, j = pos[:, None], pos[None, :]
    return (j <= p) & (p - j < window)


def _check_retrieval(model: torch.nn.Module, retrieval: Any) -> np.ndarray:
    arr = as_retrieval(retrieval)
    expected = _model_shape(model)
    if tuple(arr.shape) != expected:
        raise ValueError(
            f"retrieval has shape {tuple(arr.shape)}, but the model has {expected[0]} layers x {expected[1]} KV heads "
            f"(expected {expected})"
        )
    return arr


def _check_input_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an integer torch.Tensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [batch, seq] with batch, seq >= 1, got {tuple(input_ids.shape)}")
    return input_ids


@torch.no_grad()
def oracle_logits(
    model: torch.nn.Module,
    retrieval: Any,
    input_ids: torch.Tensor,
    *,
    sink_size: int,
    recent_size: int,
    streaming_mode: str = "window",
    prefill_chunk_size: int | None = None,
    prompt_length: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` of one eager forward of the unmodified model under the DuoAttention masks.

    No KV cache (``use_cache=False``): every position sees exactly the keys the rule allows. ``prompt_length``
    (default ``T``) marks where the prompt ends for the ``"chunk"`` rule; tokens after it are generated tokens.
    ``max_seq_len`` (default: none) is the engine's: sliding windows at least that long are full attention, their
    layers' masks apply. The model's attention implementation is restored afterwards, also when the forward raises.
    """
    _check_rule_args(sink_size, recent_size, streaming_mode, prefill_chunk_size)
    input_ids = _check_input_ids(input_ids)
    retrieval_arr = _check_retrieval(model, retrieval)
    seq_len = input_ids.shape[1]
    _check_max_seq_len(max_seq_len, seq_len)
    masks = torch.stack(
        [
            layer_visibility(
                row,
                seq_len,
                sink_size=sink_size,
                recent_size=recent_size,
                streaming_mode=streaming_mode,
                prefill_chunk_size=prefill_chunk_size,
                prompt_length=prompt_length,
                device=input_ids.device,
            )
            for row in retrieval_arr
        ]
    )
    windows = _windows(model)
    for layer, window in enumerate(windows):
        if window and (max_seq_len is None or window < max_seq_len):
            masks[layer] = _window_visibility(seq_len, window, input_ids.device)
    with _oracle_attention_installed(model, masks, windows) as state:
        out = model(input_ids=input_ids, use_cache=False)
    if state.calls != [1] * len(state.calls):
        raise RuntimeError(
            f"the oracle's attention ran {state.calls} times per layer (expected once each): "
            f"{type(model).__name__} does not route every layer's attention through transformers' AttentionInterface"
        )
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _eos_list(eos_token_id: int | Sequence[int] | torch.Tensor | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(t) for t in eos_token_id.flatten().tolist()]
    if isinstance(eos_token_id, (int, np.integer)):
        return [int(eos_token_id)]
    return [int(t) for t in eos_token_id]


@torch.no_grad()
def oracle_generate(
    model: torch.nn.Module,
    retrieval: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    sink_size: int,
    recent_size: int,
    streaming_mode: str = "window",
    prefill_chunk_size: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_seq_len: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by full recompute each step (O(n^2) forwards; for tiny models).

    Returns ``(sequences [B, T + n], scores)`` with ``n <= max_new_tokens`` and ``scores`` a list of ``n`` fp32
    ``[B, V]`` logits, like Hugging Face ``generate(do_sample=False, output_scores=True)``. With ``eos_token_id`` (an
    id or a list of ids), a row that has produced eos gets ``pad_token_id`` afterwards (default: the first eos id, as
    in Hugging Face), and decoding stops early once every row is done. ``eos_token_id=None`` never stops early.
    In ``"chunk"`` mode the prompt is the first ``T`` tokens and each generated token is its own chunk.
    ``max_seq_len``: as for ``oracle_logits``.
    """
    _check_rule_args(sink_size, recent_size, streaming_mode, prefill_chunk_size)
    input_ids = _check_input_ids(input_ids)
    _check_retrieval(model, retrieval)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_max_seq_len(max_seq_len, input_ids.shape[1] + int(max_new_tokens))
    eos = _eos_list(eos_token_id)
    if eos and pad_token_id is None:
        pad_token_id = eos[0]
    prompt_length = input_ids.shape[1]
    sequences = input_ids.clone()
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    scores: list[torch.Tensor] = []
    for _ in range(int(max_new_tokens)):
        logits = oracle_logits(
            model,
            retrieval,
            sequences,
            sink_size=sink_size,
            recent_size=recent_size,
            streaming_mode=streaming_mode,
            prefill_chunk_size=prefill_chunk_size,
            prompt_length=prompt_length,
            max_seq_len=max_seq_len,
        )[:, -1, :]
        scores.append(logits)
        next_tokens = logits.argmax(dim=-1).to(sequences.dtype)
        if eos:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
            unfinished = unfinished & ~torch.isin(next_tokens, eos_t)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if eos and not bool(unfinished.any()):
            break
    return sequences, scores
