"""Pass 1: find every attention node and tag it with its layer, q/k/v/o producers, head counts and scale.

Matches ``aten.scaled_dot_product_attention`` (the form torch.export leaves for SDPA attention). For each one it
looks through Hugging Face's ``repeat_kv`` (unsqueeze -> expand -> reshape) to the per-KV-head key and value,
and finds the linear layers that produce q, k, v and consume the output. Emits nothing: it fills
``ctx.sites`` and sets ``node.meta["duo_attention"]``. Anything it cannot recognise is an error that names the
node, never a silent skip.

It is also where a model is accepted: each SDPA node must be attention the later passes lower exactly, or the
compile stops with an error naming the node and the reason. Its mask must be causal or a causal sliding window
(``attention_mask.read_window``, matching the window the config declares for that layer); q, k and v must come
from their projections head by head (``head_paths.head_wise_params``), from separate linear layers or from
column slices of one shared layer; no dropout, a 4-D head layout.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import fx

from .attention_mask import read_window
from .context import AttentionSite, PassContext
from .graph_utils import VIEW_OPS, find_producers, is_linear, shape_of
from .head_paths import head_wise_params

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
# What an attention-like graph may contain instead of SDPA; named in the error when no SDPA is found.
_ATTENTION_LIKE = ("softmax", "bmm", "matmul", "baddbmm", "scaled_dot_product", "flex_attention", "attention")


def _is_full_slice(node: fx.Node) -> bool:
    """``x[:, :, ...]``-style slices that keep a whole dimension (indexing with None traces to these)."""
    if node.target is not aten.slice.Tensor:
        return False
    dim, start, end, step = (list(node.args[1:]) + [0, 0, None, 1][len(node.args) - 1:])[:4]
    size = shape_of(node.args[0])[dim]
    return start in (0, None) and step == 1 and (end is None or end >= 2**62 or end == size)


def _through_repeat_kv(node: fx.Node) -> fx.Node:
    """``reshape(expand(unsqueeze(x, 2)))`` (repeat_kv) -> x; any other value is returned as it is."""
    cur = node
    while cur.op == "call_function" and (cur.target in VIEW_OPS or _is_full_slice(cur)):
        if cur.target is aten.unsqueeze.default and cur.args[1] == 2 and len(shape_of(cur.args[0])) == 4:
            return _strip_full_slices(cur.args[0])
        cur = cur.args[0]
    return node


def _strip_full_slices(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and _is_full_slice(node):
        node = node.args[0]
    return node


def _single_linear(site_node: fx.Node, value: fx.Node, what: str, forward: bool = False) -> fx.Node:
    found = find_producers(value, is_linear, forward=forward)
    if len(found) != 1 or found[0].args[1].op != "get_attr":
        names = [n.name for n in found] or "none"
        raise ValueError(
            f"attention node {site_node.name}: expected exactly one linear layer with a weight parameter "
            f"{'consuming' if forward else 'producing'} {what}, found {names}"
        )
    return found[0]


def _describe_attention_like(gm: fx.GraphModule) -> str:
    counts = Counter(
        str(n.target) for n in gm.graph.nodes
        if n.op == "call_function" and any(word in str(n.target) for word in _ATTENTION_LIKE)
    )
    return ", ".join(f"{name} x{c}" for name, c in sorted(counts.items())) or "no attention-like ops at all"


def _site(gm: fx.GraphModule, node: fx.Node, layer: int, ctx: PassContext, masks_seen: dict) -> AttentionSite:
    q, k_rep, v_rep = node.args[:3]
    kwargs = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]), **node.kwargs)
    if kwargs.get("dropout_p", 0.0) not in (0, 0.0):
        raise ValueError(f"attention node {node.name} uses dropout_p={kwargs['dropout_p']}; capture in eval mode")
    mask = kwargs.get("attn_mask")
    if mask is None and not kwargs.get("is_causal", False):
        raise ValueError(f"attention node {node.name} is neither causal nor masked: not a decoder's attention")
    k, v = _through_repeat_kv(k_rep), _through_repeat_kv(v_rep)
    q_shape, k_shape, v_shape = shape_of(q), shape_of(k), shape_of(v)
    if len(q_shape) != 4 or len(k_shape) != 4 or k_shape[1:] != v_shape[1:] or q_shape[3] != k_shape[3]:
        raise ValueError(
            f"attention node {node.name}: unexpected shapes q {q_shape}, k {k_shape}, v {v_shape} "
            "(expected [B, heads, T, head_dim] and [B, kv_heads, T, head_dim])"
        )
    num_heads, num_kv_heads, head_dim = int(q_shape[1]), int(k_shape[1]), int(q_shape[3])
    if num_heads % num_kv_heads:
        raise ValueError(f"attention node {node.name}: {num_heads} query heads not a multiple of {num_kv_heads}")
    scale = kwargs.get("scale")
    site = AttentionSite(
        layer=layer,
        node=node,
        q=q,
        k=k,
        v=v,
        q_proj=_single_linear(node, q, "the query"),
        k_proj=_single_linear(node, k, "the key"),
        v_proj=_single_linear(node, v, "the value"),
        o_proj=_single_linear(node, node, "the attention output", forward=True),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
    )
    site.segments = _segments(site)
    _check_projection_shapes(site)
    for what, heads in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)):
        site.head_params[what] = head_wise_params(
            node.name, getattr(site, f"{what}_proj"), getattr(site, what), heads, head_dim,
            {"q": "query", "k": "key", "v": "value"}[what], None if site.segments is None else site.segments[what])
    site.window = _window(gm, site, mask, ctx, masks_seen)
    return site


def _segments(site: AttentionSite) -> dict | None:
    """The columns of q, k and v in a projection the three share, or None for three separate projections."""
    projs = (site.q_proj, site.k_proj, site.v_proj)
    if len(set(projs)) == 3:
        return None
    if len(set(projs)) != 1:
        raise ValueError(f"attention node {site.node.name}: two of q, k, v share a linear layer and one does not "
                         f"({', '.join(p.name for p in projs)}); duo_compile splits one shared q/k/v projection only")
    q_width, kv_width = site.num_heads * site.head_dim, site.num_kv_heads * site.head_dim
    return {"q": (0, q_width), "k": (q_width, q_width + kv_width),
            "v": (q_width + kv_width, q_width + 2 * kv_width)}


def _window(gm: fx.GraphModule, site: AttentionSite, mask: fx.Node | None, ctx: PassContext, seen: dict) -> int:
    """The layer's sliding window as its mask computes it (0: causal), checked against the config's; a window of
    ``max_seq_len`` or more counts as causal (no query of the engine sees it hide a key)."""
    declared = ctx.declared_windows[site.layer] if site.layer < len(ctx.declared_windows) else 0
    limit = ctx.max_seq_len or (1 << 62)
    if mask is None:
        window = 0
    else:
        longest = max(ctx.declared_windows, default=0)
        window = read_window(gm, site.node, mask, min(limit, max(longest, 64) + 8), seen)
    expected = declared if 0 < declared < limit else 0
    if window != expected:
        said = f"a sliding window of {declared} tokens" if declared else "full attention"
        found = f"a sliding window of {window} tokens" if window else "causal"
        raise ValueError(f"attention node {site.node.name} (layer {site.layer}): its mask is {found}, but the "
                         f"model's config declares {said} for this layer")
    return window


def _check_projection_shapes(site: AttentionSite) -> None:
    """The reorder pass moves weight rows in head-sized blocks: make sure the blocks are what we think."""
    expected = {
        "q_proj": (site.q_proj, 0, site.num_heads * site.head_dim),
        "k_proj": (site.k_proj, 0, site.num_kv_heads * site.head_dim),
        "v_proj": (site.v_proj, 0, site.num_kv_heads * site.head_dim),
        "o_proj": (site.o_proj, 1, site.num_heads * site.head_dim),
    }
    if site.segments is not None:
        expected = {"qkv_proj": (site.q_proj, 0, site.segments["v"][1]), "o_proj": expected["o_proj"]}
    for name, (linear, dim, size) in expected.items():
        weight_shape = shape_of(linear.args[1])
        if weight_shape[dim] != size:
            raise ValueError(
                f"attention node {site.node.name}: {name} ({linear.name}) weight has shape {weight_shape}, "
                f"expected {size} along dim {dim}"
            )


def find_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Tag each SDPA node (in graph order = layer order) and record an ``AttentionSite`` per layer."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    if not nodes:
        raise ValueError(
            "no scaled_dot_product_attention node found in the captured graph (found instead: "
            f"{_describe_attention_like(gm)}); duo_compile needs attention that goes through SDPA"
        )
    if ctx.expected_layers is not None and len(nodes) != ctx.expected_layers:
        raise ValueError(f"found {len(nodes)} attention nodes but the model declares {ctx.expected_layers} layers")
    masks_seen: dict = {}
    ctx.sites = [_site(gm, node, layer, ctx, masks_seen) for layer, node in enumerate(nodes)]
    for site in ctx.sites:
        site.node.meta["duo_attention"] = site
    expected_shape = (len(ctx.sites), ctx.sites[0].num_kv_heads)
    if tuple(ctx.retrieval.shape) != expected_shape:
        raise ValueError(
            f"masks have shape {tuple(ctx.retrieval.shape)} but the model has {expected_shape[0]} layers x "
            f"{expected_shape[1]} KV heads"
        )
    ctx.record("find_attention", len(ctx.sites))
    return gm
