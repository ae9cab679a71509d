"""What an SDPA node's mask is: causal, or a causal sliding window of some width; anything else is refused.

Hugging Face builds the mask of a captured model from the sequence length alone (no KV cache, no padding): a
small subgraph of index arithmetic between the inputs and SDPA's ``attn_mask``. This reads it by running that
subgraph at concrete lengths and comparing the result with the two patterns the duo ops implement, a query at
position ``p`` seeing keys ``j <= p`` (causal) or ``p - window < j <= p`` (a sliding window). The lengths checked
are 1, 2, and ``check_len``, which the caller makes longer than every window the config declares (capped at the
engine's ``max_seq_len``: a window that long never hides a key from the engine's queries), so the boundary of
each window is in the checked matrix. A mask that differs from both patterns at any checked length (a bias, a
per-head mask, a bidirectional block) is an error naming the node.
"""
from __future__ import annotations

import torch
from torch import fx

from .graph_utils import shape_of

aten = torch.ops.aten


def mask_subgraph(gm: fx.GraphModule, mask: fx.Node) -> fx.GraphModule:
    """A module computing ``mask`` from the graph's inputs (``input_ids``, ``position_ids``), sharing ``gm``'s
    attributes; only the nodes ``mask`` depends on are copied."""
    needed, todo = set(), [mask]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)  # every input, so the module keeps the graph's signature
        elif node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[mask])
    return fx.GraphModule(gm, graph)


def visible_keys(gm: fx.GraphModule, length: int, device) -> torch.Tensor:
    """``[length, length]`` bool of a mask module's output for one row of ``length`` tokens at positions 0..T-1:
    a bool mask as it is, a float mask's zeros (transformers' additive masks hold 0 or a very negative value)."""
    ids = torch.zeros(1, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)[None]
    with torch.no_grad():
        mask = gm(ids, positions)
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (length, length):
        raise _Refused(f"its mask has shape {tuple(mask.shape)} at {length} tokens, not [B, 1, T, T] (one mask "
                       f"shared by the heads)")
    mask = mask[0, 0]
    if mask.dtype == torch.bool:
        return mask
    blocked = mask < -1e4  # transformers fills masked scores with the dtype's minimum
    if not bool(((mask == 0) | blocked).all()):
        raise _Refused("its mask adds a bias to the scores (values other than 0 and -inf), not a visibility mask")
    return ~blocked


class _Refused(ValueError):
    pass


def read_window(gm: fx.GraphModule, sdpa: fx.Node, mask: fx.Node, check_len: int, cache: dict) -> int:
    """0 if ``mask`` is causal at every checked length, else the window ``w < check_len`` it keeps; ValueError
    naming ``sdpa`` and the reason for any other mask. ``cache`` holds the answers per mask node (layers share
    their masks)."""
    if mask in cache:
        return cache[mask]
    device = mask.meta["val"].device if "val" in mask.meta else "cpu"
    try:
        module = mask_subgraph(gm, mask)
        window = 0
        for length in sorted({1, 2, check_len}):  # the last one, check_len, decides the window
            visible = visible_keys(module, length, device)
            pos = torch.arange(length, device=visible.device)
            last_row = visible[-1]
            seen = int(last_row.sum())
            w = 0 if seen == length else seen
            window = w
            expected = pos[None, :] <= pos[:, None]
            if w:
                expected &= pos[:, None] - pos[None, :] < w
            if not torch.equal(visible, expected):
                raise _Refused(f"its mask at {length} tokens is neither causal nor a causal sliding window")
    except _Refused as err:
        raise ValueError(f"attention node {sdpa.name}: {err}; duo_compile lowers causal and sliding-window "
                         f"attention only") from None
    except Exception as err:
        raise ValueError(f"attention node {sdpa.name}: cannot evaluate its mask ({mask.name}, shape "
                         f"{shape_of(mask)}) from the sequence length: {type(err).__name__}: {err}") from None
    cache[mask] = window
    return window
