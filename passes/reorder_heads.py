"""Pass 2: reorder KV heads per layer so retrieval heads come first; the model's outputs are unchanged.

Matches the q/k/v/o projections of every site found by ``find_attention``. Emits no nodes: it replaces the
projection weights (and biases) with permuted copies. A stable partition puts the retrieval KV heads first,
each with its GQA group of query heads, so later passes split a layer with one contiguous slice instead of a
gather. q rows move in blocks of ``groups * head_dim``, k/v rows in blocks of ``head_dim``, o_proj input columns
in blocks of ``groups * head_dim``. RoPE acts inside each head, so it is unaffected.

Under tensor parallelism (``ctx.tensor_parallel``) the order is this rank's heads of the head placement
(``parallel/placement.py``, retrieval first) and the blocks of the other ranks' heads are left out: the rank's
projections hold only its heads (never a copy of the others'), the site's head counts and ``retrieval_counts``
become this rank's, and pass 3 sums the ranks' o_proj outputs.
"""
from __future__ import annotations

import torch
from torch import fx

from .context import AttentionSite, PassContext
from .graph_utils import get_param, linear_bias, set_param


def _permute_blocks(gm: fx.GraphModule, param_node: fx.Node | None, order: list[int], dim: int, count: int) -> None:
    """Take the blocks ``order`` (all of them permuted, or some) of a parameter's ``count`` equal blocks along
    ``dim`` (a new tensor; the old one is untouched)."""
    if param_node is None:
        return
    if len(param_node.users) != 1:
        raise ValueError(f"parameter {param_node.target} is shared by {len(param_node.users)} nodes; cannot reorder")
    tensor = get_param(gm, param_node)
    blocks = tensor.unflatten(dim, (count, -1))
    index = torch.tensor(order, device=tensor.device)
    set_param(gm, param_node.target, blocks.index_select(dim, index).flatten(dim, dim + 1).contiguous())


def _reorder_site(gm: fx.GraphModule, site: AttentionSite, order: list[int]) -> None:
    for linear in (site.q_proj, site.k_proj, site.v_proj):
        _permute_blocks(gm, linear.args[1], order, 0, site.num_kv_heads)
        _permute_blocks(gm, linear_bias(linear), order, 0, site.num_kv_heads)
    _permute_blocks(gm, site.o_proj.args[1], order, 1, site.num_kv_heads)


def reorder_heads(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Permute projections so that in layer l the KV heads ``[0, retrieval_counts[l])`` are the retrieval heads
    (under tensor parallelism: keep only this rank's heads, retrieval first)."""
    ctx.retrieval_counts, ctx.head_order = [], []
    changed = 0
    for site in ctx.sites:
        is_retrieval = [bool(x) for x in ctx.retrieval[site.layer]]
        if ctx.tensor_parallel:
            order = ctx.tensor_parallel.heads(site.layer)
        else:
            order = [h for h in range(site.num_kv_heads) if is_retrieval[h]]
            order += [h for h in range(site.num_kv_heads) if not is_retrieval[h]]
        ctx.retrieval_counts.append(sum(is_retrieval[h] for h in order))
        ctx.head_order.append(order)
        if order != list(range(site.num_kv_heads)):
            _reorder_site(gm, site, order)
            changed += 1
        site.num_heads = site.num_heads * len(order) // site.num_kv_heads
        site.num_kv_heads = len(order)
    ctx.record("reorder_heads", changed)
    return gm
