"""One rank of the tensor-parallel tests (``tests/test_tensor_parallel.py`` starts two): ``python -m
tests.tp_worker OUT`` with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Every case runs here in one process per rank, since starting a process and importing torch and transformers
costs more than the cases: the errors that need a process group, then, per engine configuration, the sharded
engine beside the single-process engine of the same model (fp32), on the same requests. Each rank compares its
own results and writes them to ``OUT.<rank>.json`` for the test to assert on.
"""
from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist

import duo_compile
from duo_compile.parallel.placement import natural_placement, rank_counts
from tests.shared_capture import compile_reuses_captures
from tests.tiny_models import mixed_gates, tiny_model

# (name, arch, gqa, streaming mode): Llama and Qwen2 (q/k/v biases), MHA and GQA, both streaming modes, in two
# engines (one capture per rank each, shared by the single-process and the sharded compile). MHA: each rank holds a
# mixed layer (one op over both head groups); GQA: one KV head per rank, so every layer of a rank is all retrieval
# or all streaming. The Llama model has biases on every projection (attention_bias, mlp_bias), so o_proj and
# down_proj have the row-parallel bias too.
ENGINES = [
    ("llama_mha_biases_window", "llama", False, "window"),
    ("qwen2_gqa_chunk", "qwen2", True, "chunk"),
]
SIZES = {"sink_size": 2, "recent_size": 4, "max_seq_len": 64, "backend": "eager"}


def _masks(num_kv_heads: int) -> duo_compile.HeadMasks:
    """Mixed masks (an all-retrieval, a mixed and an all-streaming layer); with 4 KV heads the mixed layer's
    retrieval heads are the first two, so the natural split puts both on rank 0 and the balanced one does not."""
    gates = mixed_gates(3, num_kv_heads)
    if num_kv_heads == 4:
        gates[1] = [1, 1, 0, 0]
    return duo_compile.HeadMasks.from_gates(gates)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def _errors(rank: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model("llama", gqa=True)
    masks = _masks(2)
    out = {"wrong_size": _error(lambda: duo_compile.compile(model, masks, tensor_parallel_size=4, **SIZES))}
    # A different model on rank 1 (another seed), then different masks on rank 1: every rank raises.
    other = tiny_model("llama", gqa=True, seed=rank)
    out["models_differ"] = _error(lambda: duo_compile.compile(other, masks, tensor_parallel_size=2, **SIZES))
    other_masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, 2)[::-1] if rank else mixed_gates(3, 2))
    out["masks_differ"] = _error(lambda: duo_compile.compile(model, other_masks, tensor_parallel_size=2, **SIZES))
    torch.manual_seed(0)
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64))
    out["kv_heads_indivisible"] = _error(
        lambda: duo_compile.compile(odd, mixed_gates(3, 3), tensor_parallel_size=2, **SIZES))
    return out


def _compare(single, sharded, rank: int) -> dict:
    """Tokens equal, scores within fp32 rounding, and the same tokens on every rank."""
    same = torch.equal(single.sequences, sharded.sequences)
    diff = 0.0
    for a, b in zip(single.scores, sharded.scores):  # top-k leaves -inf: equal there, compared where finite
        finite = a.isfinite()
        diff = max(diff, float((a - b)[finite].abs().max()) if torch.equal(finite, b.isfinite()) else float("inf"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sharded.sequences.tolist())
    return {"tokens_equal": same, "max_score_diff": diff, "ranks_agree": all(g == gathered[0] for g in gathered)}


def _cache_heads(engine) -> dict:
    """``"layer/kind"`` -> KV heads of the engine's key cache of that layer and kind."""
    return {f"{spec.layer}/{spec.kind}": spec.num_kv_heads for spec in engine.cache_specs if spec.tensor == "k"}


def _requests(rank: int, vocab: int) -> dict:
    """name -> (input_ids, generate arguments): batch 2, whole and chunked prefill, a left-padded batch,
    sampling; rank 1 passes no input_ids to the sharded engine in the first (rank 0's are used)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 left-padded: 8 real tokens
    common = {"max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True}
    return {
        "greedy": (ids, common),
        "chunked_prefill": (ids, dict(common, prefill_chunk_size=5)),
        "left_padded": (ids, dict(common, attention_mask=mask)),
        "sampling": (ids, dict(common, do_sample=True, top_k=20, temperature=1.5)),
    }


def _seeded(kwargs: dict) -> dict:
    """A fresh generator of one seed for a sampling request (the same draws for both engines)."""
    return {"generator": torch.Generator().manual_seed(7)} if kwargs.get("do_sample") else {}


def _engine_cases(rank: int) -> dict:
    out = {}
    for name, arch, gqa, mode in ENGINES:
        model = tiny_model(arch, gqa=gqa, biases=arch == "llama")
        masks = _masks(model.config.num_key_value_heads)
        with compile_reuses_captures():  # tests/shared_capture.py
            single = duo_compile.compile(model, masks, streaming_mode=mode, **SIZES)
            sharded = duo_compile.compile(model, masks, streaming_mode=mode, tensor_parallel_size=2, **SIZES)
        if name == ENGINES[0][0]:
            out["export_refused"] = _error(lambda engine=sharded: duo_compile.export(engine, "unused.pt2"))
        retrieval = masks.retrieval
        tp = sharded.tensor_parallel
        out[f"{name}/placement"] = {
            "natural": rank_counts(retrieval, natural_placement(retrieval, 2)).tolist(),
            "balanced": rank_counts(retrieval, tp.placement).tolist(),
            "cache_heads": _cache_heads(sharded),
            "single_cache_heads": _cache_heads(single),
        }
        for request, (ids, kwargs) in _requests(rank, model.config.vocab_size).items():
            expected = single.generate(ids, **kwargs, **_seeded(kwargs))
            given = None if (rank == 1 and request == "greedy") else ids
            got = sharded.generate(given, **kwargs, **_seeded(kwargs))
            out[f"{name}/{request}"] = _compare(expected, got, rank)
    return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        results = {"errors": _errors(rank), **_engine_cases(rank)}
    except Exception:  # noqa: BLE001 - any failure is reported to the test, with its traceback
        results = {"crash": traceback.format_exc()}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
