"""Pass 3 (tensor parallelism only): the rank's share of the MLP, and all-reduces that sum the ranks' shares.

Runs when ``compile(..., tensor_parallel_size=N)`` gives the context a ``TensorParallel`` (else it is recorded as
skipped). ``reorder_heads`` has already kept this rank's KV heads (with their query heads) in q/k/v and the
matching input columns of o_proj, and made the site's head counts this rank's, so the later passes (and the
caches they add) see only the rank's heads. Matches, per layer, the attention site's o_proj and the MLP (the
linear layer fed by exactly two linear layers that read one input: gate/up -> down). Emits the Megatron layout:

- column parallel: gate/up rows (and biases) of this rank's ``1/N`` of the MLP width (copies);
- row parallel: the matching input columns of down_proj (a copy); o_proj and down_proj outputs are then partial
  sums, each followed by ``_c10d_functional.all_reduce`` + ``wait_tensor`` (the ops
  ``torch.distributed._functional_collectives`` is made of), so the collectives are graph nodes that Inductor
  schedules and CUDA graphs capture. A row-parallel bias is kept on rank 0 only (added once to the sum).

The views in the captured graph size heads and widths with -1, so they follow the narrower projections.

Why a pass over the captured graph rather than ``torch.distributed.tensor.parallel.parallelize_module``: that API
shards ``nn.Linear`` modules through DTensor, while the engine runs an ATen graph of duo ops that have no DTensor
sharding rules; the functional collectives are the building block that fits such a graph (see
benchmarks/DECISIONS.md#tensor-parallel).
"""
from __future__ import annotations

import torch
from torch import fx

from .context import PassContext
from .graph_utils import (
    drop_param,
    find_producers,
    get_param,
    is_linear,
    linear_bias,
    set_param,
)

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


def _keep(gm: fx.GraphModule, node: fx.Node | None, dim: int, rank: int, size: int) -> None:
    """Replace a parameter by a copy of its ``rank``-th of ``size`` equal slices along ``dim``."""
    if node is None:
        return
    if len(node.users) != 1:
        raise ValueError(f"parameter {node.target} is shared by {len(node.users)} nodes; cannot shard it")
    tensor = get_param(gm, node)
    if tensor.shape[dim] % size:
        raise ValueError(f"parameter {node.target} of shape {tuple(tensor.shape)} cannot be split in {size} along "
                         f"dim {dim}")
    part = tensor.shape[dim] // size
    set_param(gm, node.target, tensor.narrow(dim, rank * part, part).clone())


def _all_reduce_after(gm: fx.GraphModule, linear: fx.Node, rank: int, group_name: str) -> None:
    """Sum a row-parallel linear's partial outputs over the ranks (its bias added on rank 0 only)."""
    bias = linear_bias(linear)
    if bias is not None and rank != 0:
        linear.args, linear.kwargs = linear.args[:2], {k: v for k, v in linear.kwargs.items() if k != "bias"}
        if not bias.users:
            drop_param(gm, bias)
    graph = gm.graph
    with graph.inserting_after(linear):
        reduced = graph.call_function(ALL_REDUCE, (linear, "sum", group_name))
    with graph.inserting_after(reduced):
        waited = graph.call_function(WAIT, (reduced,))
    for node in (reduced, waited):
        if "val" in linear.meta:
            node.meta["val"] = linear.meta["val"]
    linear.replace_all_uses_with(waited, delete_user_cb=lambda user: user is not reduced)


def mlp_blocks(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[list[fx.Node], fx.Node]]:
    """Per layer, ``([gate, up], down)``: the linear layers fed by exactly two other linear layers that read one
    input and are not attention projections. One per attention site, else an error naming the counts."""
    attention = {n for s in ctx.sites for n in (s.q_proj, s.k_proj, s.v_proj, s.o_proj)}
    blocks = []
    for node in gm.graph.nodes:
        if not is_linear(node) or node in attention:
            continue
        feeding = find_producers(node.args[0], is_linear)
        if len(feeding) == 2 and feeding[0].args[0] is feeding[1].args[0] and not attention & set(feeding):
            blocks.append((sorted(feeding, key=lambda n: n.name), node))
    if len(blocks) != len(ctx.sites):
        raise ValueError(f"tensor parallelism: found {len(blocks)} MLP blocks (gate/up -> down) for "
                         f"{len(ctx.sites)} attention layers; this model's MLP cannot be sharded")
    return blocks


def tensor_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    tp = ctx.tensor_parallel
    rank, size = tp.rank, tp.size
    blocks = mlp_blocks(gm, ctx)
    for site in ctx.sites:
        _all_reduce_after(gm, site.o_proj, rank, tp.group_name)
    for columns, down in blocks:
        for linear in columns:
            _keep(gm, linear.args[1], 0, rank, size)
            _keep(gm, linear_bias(linear), 0, rank, size)
        _keep(gm, down.args[1], 1, rank, size)
        _all_reduce_after(gm, down, rank, tp.group_name)
    ctx.record("tensor_parallel", len(ctx.sites))
    return gm
