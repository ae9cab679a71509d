"""ONNX backend: the rewritten graph with its ``duo::`` ops lowered to standard ONNX ops, run by onnxruntime.

ONNX has no in-place update, so the cached ops cannot keep their meaning of "write this chunk into the cache,
then attend". The ONNX graph is pure instead:

    forward(input_ids [B, T], position_ids [B, T], cache_start [B], valid [B], *caches)
        -> (logits [B, 1, V], *rows)          rows[i]: this chunk's keys/values for cache i, [B, H_i, T, D]

Each cached op becomes plain attention over ``[cache slots ; this chunk]`` with a per-row visibility mask computed
from ``cache_start`` (``onnx_retrieval_attention`` / ``onnx_streaming_attention`` below: the reference math of
``kernels/reference.py`` written with shape-static tensor ops, no ``.item()``), and the chunk's K/V rows become
graph outputs. The caches are read-only inputs; ``OnnxRunner`` binds them with IO binding (no copy) and appends
each row's real returned rows (its first ``valid[b]``; padding is never written) in place: retrieval rows at slots
``start[b] ..``, streaming rows by the ring write plan of ``reference.streaming_write_plan``. So the KV cache is
never copied or duplicated; each step moves only its own T rows. (Returning whole updated caches instead would
need a second set of caches to ping-pong, 2x the KV memory, plus a full cache copy inside the graph every step.)

Shapes, for TensorRT's ONNX parser (optimization profile):
  dynamic: batch ``B`` (1 .. ``MAX_BATCH``) and chunk length ``T`` (1 .. ``max_seq_len``);
  static:  every cache's slot dimension (``max_seq_len`` for retrieval caches, ``sink + recent`` for streaming
           caches), heads, head_dim, vocab. ``cache_start`` / ``valid`` hold int64 ``[B]``: each row's first
           position and number of real tokens.
  Ops: standard ai.onnx opset ``OPSET`` (MatMul, Softmax, Where, Concat, Range, Mod, ... ; no custom domain and
  no ``Attention`` node, which needs opset 23). Attention over a retrieval cache spans all ``max_seq_len`` slots
  (masked), so its cost does not shrink with the context actually used, and a prefill chunk of T tokens builds
  ``[B, H, T, max_seq_len + T]`` fp32 scores: at long ``max_seq_len`` use short prefill chunks.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx

from duo_compile.kernels import reference
from duo_compile.kernels.ops import OPS
from duo_compile.export.engine_file import example_inputs
from duo_compile.passes import CacheSpec

OPSET = 18
MAX_BATCH = 1024
OUTPUT_PREFIX = "new_"  # output "new_<cache name>": the chunk's rows for that cache


# ------------------------------------------------------------------------------------------------ the lowering
def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float):
    """Masked fp32 attention with GQA (as ``reference._attend``): q [B,Hq,T,D], keys/values [B,Hkv,S,D], visible
    [B,T,S] (per row). Query heads are viewed as [B, Hkv, groups, T, D] and broadcast against their KV head, so K/V
    are never expanded to the query head count."""
    batch, q_heads, length, dim = q.shape
    kv_heads = keys.shape[1]
    q5 = q.reshape(batch, kv_heads, q_heads // kv_heads, length, dim).float()
    scores = torch.matmul(q5, keys[:, :, None].float().transpose(-1, -2)) * scale
    scores = torch.where(visible[:, None, None], scores, torch.full_like(scores, float("-inf")))
    out = torch.matmul(torch.softmax(scores, dim=-1), values[:, :, None].float())
    return out.reshape(batch, q_heads, length, dim).to(q.dtype)


def onnx_retrieval_attention(q, k, v, k_cache, v_cache, cache_start, valid, scale: float):
    """Causal attention over ``[retrieval cache ; chunk]`` without writing: cache slot s (position s) is visible
    to row b iff ``s < cache_start[b]``; chunk token j is visible to chunk query i iff ``j <= i``."""
    batch, length = q.shape[0], q.shape[2]
    slot = torch.arange(k_cache.shape[2], device=q.device)
    idx = torch.arange(length, device=q.device)
    cached = (slot[None, None, :] < cache_start[:, None, None]).expand(batch, length, k_cache.shape[2])
    causal = (idx[None, :] <= idx[:, None])[None].expand(batch, length, length)
    visible = torch.cat([cached, causal], dim=2)
    keys, values = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
    return _attend(q, keys, values, visible, scale)


def _streaming_slot_positions(start: torch.Tensor, sink: int, recent: int, device) -> torch.Tensor:
    """``reference.streaming_slot_positions`` with ``start`` ``[B, 1]`` (each row's): position held by each slot,
    ``[B, sink + recent]``, -1 if empty. The ring's modulus is taken of a non-negative number (ONNX Mod and torch
    agree there)."""
    slots = torch.arange(sink + recent, device=device)[None, :]
    sink_pos = torch.where(slots < start, slots, torch.full_like(slots, -1))
    j = slots - sink
    # start - 1 - sink - j >= -(sink + recent): shift by a multiple of recent to stay non-negative.
    shift = recent * ((sink + recent) // recent + 1)
    ring_pos = start - 1 - torch.remainder(start - 1 - sink - j + shift, recent)
    ring_pos = torch.where(ring_pos >= sink, ring_pos, torch.full_like(ring_pos, -1))
    return torch.where(slots < sink, sink_pos, ring_pos)


def onnx_streaming_attention(q, k, v, k_cache, v_cache, cache_start, valid, scale: float, sink: int, recent: int,
                             chunk_mode: bool):
    """Sink + recent attention over ``[streaming cache ; chunk]`` without writing (``reference`` reads before it
    writes too, so this is its read half), per row. Window mode: key p' visible to query p iff ``p' <= p`` and
    (``p' < sink`` or ``p' > p - recent``); chunk mode replaces ``p - recent + 1`` by ``start - recent``."""
    start = cache_start[:, None]  # [B, 1]
    slot_pos = _streaming_slot_positions(start, sink, recent, q.device)
    chunk_pos = start + torch.arange(q.shape[2], device=q.device)[None, :]  # [B, T]
    key_pos = torch.cat([slot_pos, chunk_pos], dim=1)
    qp, kp = chunk_pos[:, :, None], key_pos[:, None, :]
    lower = (start - recent)[:, :, None] if chunk_mode else qp - recent + 1
    visible = (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp >= lower))
    keys, values = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
    return _attend(q, keys, values, visible, scale)


def onnx_attention(q, k, v, k_retrieval, v_retrieval, k_streaming, v_streaming, cache_start, valid, scale: float,
                   retrieval_kv_heads: int, sink: int, recent: int, chunk_mode: bool):
    """``duo::attention_cached`` (a mixed layer) as the two lowerings above on its head groups, side by side."""
    retrieval_qkv, streaming_qkv = reference.head_groups(q, k, v, retrieval_kv_heads)
    retrieval = onnx_retrieval_attention(*retrieval_qkv, k_retrieval, v_retrieval, cache_start, valid, scale)
    streaming = onnx_streaming_attention(*streaming_qkv, k_streaming, v_streaming, cache_start, valid, scale, sink,
                                         recent, chunk_mode)
    return torch.cat([retrieval, streaming], dim=1)


def _rotate_first(graph: fx.Graph, node: fx.Node) -> None:
    """An op given pre-RoPE q/k and ``cos``/``sin`` (``fuse_rope``) gets them rotated in the graph instead (plain
    ONNX ops), so the lowerings and the returned cache rows see rotated keys, as the caches hold them."""
    if "cos" not in node.kwargs:
        return
    cos, sin = node.kwargs["cos"], node.kwargs["sin"]
    with graph.inserting_before(node):
        q, k = (graph.call_function(reference.rope, (x, cos, sin)) for x in node.args[:2])
    node.args = (q, k, *node.args[2:])
    node.kwargs = {key: value for key, value in node.kwargs.items() if key not in ("cos", "sin")}


def _cache_rows(graph: fx.Graph, node: fx.Node) -> dict[str, fx.Node]:
    """The chunk's K/V rows each cache of a lowered duo op receives, by cache placeholder name (slices of k/v for
    the merged op, inserted before ``node``)."""
    if node.target is OPS["attention_cached"]:
        _, k, v, k_r, v_r, k_s, v_s, _, _, _, n, *_ = node.args
        rows = {}
        with graph.inserting_before(node):
            for cache, value, lo, hi in ((k_r, k, 0, n), (v_r, v, 0, n), (k_s, k, n, None), (v_s, v, n, None)):
                rows[cache.name] = graph.call_function(torch.ops.aten.slice.Tensor, (value, 1, lo, hi))
        return rows
    _, k, v, k_cache, v_cache, *_ = node.args
    return {k_cache.name: k, v_cache.name: v}


def onnx_graph(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of the rewritten graph with the cached duo ops replaced by their pure ONNX-friendly forms.

    Output: ``(logits, *rows)``, rows in the order of the cache placeholders (``k``/``v`` of each cached op).
    The original graph is not modified.
    """
    new_graph = copy.deepcopy(graph.graph)
    placeholders = [n for n in new_graph.nodes if n.op == "placeholder"]
    cache_names = [n.name for n in placeholders[4:]]
    rows: dict[str, fx.Node] = {}
    lowered = {
        OPS["retrieval_attention_cached"]: onnx_retrieval_attention,
        OPS["streaming_attention_cached"]: onnx_streaming_attention,
        OPS["attention_cached"]: onnx_attention,
    }
    for node in list(new_graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in lowered:
            _rotate_first(new_graph, node)
            rows.update(_cache_rows(new_graph, node))
            with new_graph.inserting_before(node):
                new = new_graph.call_function(lowered[node.target], node.args, node.kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            new_graph.erase_node(node)
        elif getattr(node.target, "namespace", None) == "duo":
            raise NotImplementedError(f"ONNX export: no ONNX lowering for {node.target} (node {node.name})")
    missing = [name for name in cache_names if name not in rows]
    if missing:
        raise ValueError(f"ONNX export: caches {missing} are not written by any duo op")
    output = next(n for n in new_graph.nodes if n.op == "output")
    output.args = ((output.args[0], *[rows[name] for name in cache_names]),)
    gm = fx.GraphModule(graph, new_graph)
    gm.recompile()
    return gm


def export_onnx_bytes(engine) -> tuple[bytes, dict]:
    """Export ``engine``'s graph to a standard-op ONNX model: (serialized model, its description for metadata)."""
    specs, max_len = engine.cache_specs, engine.config.max_seq_len
    if max_len < 2:
        raise ValueError(f"ONNX export needs max_seq_len >= 2 (a dynamic chunk length), got {max_len}")
    gm = onnx_graph(engine.graph)
    args = example_inputs(specs, max_len, engine.dtype, engine.device, batch=2, length=min(3, max_len))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    length = torch.export.Dim("chunk", min=1, max=max_len)
    dynamic = ({0: batch, 1: length}, {0: batch, 1: length}, {0: batch}, {0: batch}, *[{0: batch} for _ in specs])
    with torch.no_grad():
        program = torch.export.export(gm, args, dynamic_shapes=dynamic)
    input_names = ["input_ids", "position_ids", "cache_start", "valid", *[s.name for s in specs]]
    output_names = ["logits", *[OUTPUT_PREFIX + s.name for s in specs]]
    with _quiet_exporter():
        onnx_program = torch.onnx.export(
            program, args, input_names=input_names, output_names=output_names, opset_version=OPSET, dynamo=True,
            external_data=False, optimize=True, verbose=False,
        )
    model = onnx_program.model_proto
    _name_dynamic_dims(model, batch_dim=_dim_param(model, "input_ids", 0), chunk_dim=_dim_param(model, "input_ids", 1))
    foreign = sorted({op.domain for op in model.opset_import if op.domain not in ("", "ai.onnx")})
    if foreign:
        raise RuntimeError(f"ONNX export produced non-standard op domains {foreign}; the lowering is incomplete")
    data = model.SerializeToString()
    if len(data) >= 2**31 - 2**24:
        raise ValueError(
            f"the ONNX model is {len(data) / 2**30:.1f} GiB; ONNX files hold at most 2 GiB without external data, "
            f"which this engine format does not support yet: export with backend='aoti' instead"
        )
    description = {
        "opset": OPSET,
        "inputs": input_names,
        "outputs": output_names,
        "max_batch": MAX_BATCH,
        "max_chunk": max_len,
        "dynamic_dims": {"batch": [1, MAX_BATCH], "chunk": [1, max_len]},
    }
    return data, description


def _dim_param(model, name: str, axis: int) -> str:
    value = next(v for v in model.graph.input if v.name == name)
    return value.type.tensor_type.shape.dim[axis].dim_param


def _name_dynamic_dims(model, batch_dim: str, chunk_dim: str) -> None:
    """Give the exporter's symbolic dims (``s0``, ``s58``, ...) readable names: ``batch`` and ``chunk``."""
    names = {batch_dim: "batch", chunk_dim: "chunk"}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


class _quiet_exporter:
    """The dynamo exporter logs warnings about optional torchvision ops and prints progress; keep export quiet."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


# ---------------------------------------------------------------------------------------------------- runtime
def graph_mismatches(session, description: dict, specs: Sequence[CacheSpec], vocab_size: int,
                     max_seq_len: int) -> list[str]:
    """Where the ONNX graph's declared inputs and outputs disagree with the metadata (names, cache shapes,
    vocabulary): a second guard, beside the digest, against metadata that does not describe this graph (e.g.
    re-sealed after an edit)."""
    declared_in = {value.name: value.shape for value in session.get_inputs()}
    declared_out = {value.name: value.shape for value in session.get_outputs()}
    inputs, outputs = list(description["inputs"]), list(description["outputs"])
    if list(declared_in) != inputs or list(declared_out) != outputs:
        return [f"graph inputs/outputs {list(declared_in)} / {list(declared_out)}, metadata {inputs} / {outputs}"]
    problems = []
    logits = declared_out[outputs[0]]
    if list(logits[1:]) != [1, vocab_size]:
        problems.append(f"logits are {logits} in the graph, metadata vocab_size {vocab_size}")
    # forward(input_ids, position_ids, cache_start [B], valid [B], *caches): per-row positions
    head = ["input_ids", "position_ids", "cache_start", "valid"]
    if inputs[:4] != head:
        problems.append(f"graph inputs begin {inputs[:4]}, expected {head}")
    for name in ("cache_start", "valid"):
        if name in declared_in and len(declared_in[name]) != 1:
            problems.append(f"{name} is {declared_in[name]} in the graph, expected [batch]")
    names = inputs[4:]
    if len(names) != len(specs):
        problems.append(f"{len(names)} cache inputs in the graph, {len(specs)} cache specs in the metadata")
    for spec, name in zip(specs, names):
        want = [spec.num_kv_heads, max_seq_len if spec.slots is None else spec.slots, spec.head_dim]
        if list(declared_in[name][1:]) != want:
            problems.append(f"cache {name} is {declared_in[name]} in the graph, metadata [batch, {want[0]}, "
                            f"{want[1]}, {want[2]}]")
    return problems


_NUMPY_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class OnnxRunner:
    """Drives an ONNX engine with onnxruntime, with the ``Engine`` runner signature.

    Every input is bound by address (IO binding): the engine's caches are read in place, never copied into
    onnxruntime. Outputs are bound to scratch tensors reused across steps of the same shape (decode steps reuse
    one set), then each row's real K/V rows (its first ``valid[b]``) are written into its caches in place:
    retrieval rows at slots ``start[b] ..``, streaming rows by ``reference.streaming_write_plan`` (the ring).
    """

    def __init__(self, path: str, specs: Sequence[CacheSpec], sink: int, recent: int, vocab_size: int,
                 device: torch.device, description: dict,
                 providers: Sequence[str] | None = None):
        import numpy as np
        import onnxruntime as ort

        self.backend = "onnx"
        self.np = np
        self.specs, self.sink, self.recent = list(specs), sink, recent
        self.vocab_size, self.device = vocab_size, device
        self.inputs, self.outputs = list(description["inputs"]), list(description["outputs"])
        self.max_batch = int(description.get("max_batch", MAX_BATCH))
        if providers is None:
            providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise RuntimeError(
                f"onnxruntime here has no {missing} (available: {available}); the engine runs on {device}"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=list(providers))
        types = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
        logits_type = self.session.get_outputs()[0].type
        if logits_type not in types:
            raise ValueError(f"the ONNX runner supports float32/float16 engines; logits are {logits_type}")
        self.logits_dtype = types[logits_type]
        self._scratch: dict[tuple[int, int], list[torch.Tensor]] = {}

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        element = _NUMPY_TYPES.get(tensor.dtype)
        if element is None:
            raise ValueError(f"the ONNX runner binds float32/float16/int64 tensors, got {tensor.dtype} for {name}")
        kind = "cuda" if tensor.device.type == "cuda" else "cpu"
        index = tensor.device.index or 0
        bind(name, kind, index, getattr(self.np, element), tuple(tensor.shape), tensor.data_ptr())

    def _outputs(self, batch: int, length: int, caches) -> list[torch.Tensor]:
        """Output tensors for this shape: logits [B, 1, V] and one [B, H, T, D] row block per cache."""
        key = (batch, length)
        if key not in self._scratch:
            if len(self._scratch) >= 8:  # prefill chunk lengths vary; keep the decode set, drop the others
                self._scratch = {k: v for k, v in self._scratch.items() if k[1] == 1}
            logits = torch.empty(batch, 1, self.vocab_size, dtype=self.logits_dtype, device=self.device)
            rows = [torch.empty(batch, c.shape[1], length, c.shape[3], dtype=c.dtype, device=c.device) for c in caches]
            self._scratch[key] = [logits, *rows]
        return self._scratch[key]

    def __call__(self, input_ids, position_ids, cache_start, valid, *caches):
        batch, length = input_ids.shape
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds the exported engine's maximum batch {self.max_batch}")
        if len(caches) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} caches, got {len(caches)}")
        feeds = [
            input_ids.to(torch.int64).contiguous(),
            position_ids.to(torch.int64).contiguous(),
            cache_start.to(torch.int64).contiguous(),
            valid.to(torch.int64).contiguous(),
        ]
        for cache in caches:
            if not cache.is_contiguous() or cache.shape[0] != batch:
                raise ValueError("caches must be the engine's dense caches for this batch (engine.allocate)")
        binding = self.session.io_binding()
        for name, tensor in zip(self.inputs, [*feeds, *caches]):
            self._bind(binding.bind_input, name, tensor)
        outputs = self._outputs(batch, length, caches)
        for name, tensor in zip(self.outputs, outputs):
            self._bind(binding.bind_output, name, tensor)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch must be ready
        self.session.run_with_iobinding(binding)
        logits, rows = outputs[0], outputs[1:]
        starts, counts = cache_start.tolist(), valid.tolist()
        if len(set(starts)) == 1 and set(counts) == {length}:  # every row at one position, no padding
            starts, counts, row_slices = starts[:1], counts[:1], [slice(None)]
        else:
            row_slices = [slice(b, b + 1) for b in range(batch)]
        for rows_b, start, count in zip(row_slices, starts, counts):
            plans = {}  # per (sink, recent): the engine's streaming heads, and each window layer's ring
            for spec, cache, new in zip(self.specs, caches, rows):
                if spec.slots is None:
                    cache[rows_b, :, start : start + count].copy_(new[rows_b, :, :count])
                else:
                    window = (0, spec.window) if spec.window else (self.sink, self.recent)
                    if window not in plans:
                        tokens, slots = reference.streaming_write_plan(start, count, *window)
                        plans[window] = tokens.to(cache.device), slots.to(cache.device)
                    plan = plans[window]
                    cache[rows_b, :, plan[1]] = new[rows_b][:, :, plan[0]]
        return logits.clone()  # the scratch logits are overwritten by the next step of this shape
