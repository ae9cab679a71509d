"""duo_compile: compile a transformer into a DuoAttention engine (retrieval + streaming heads).

    masks = duo_compile.HeadMasks.from_tsv("full_attention_heads.tsv").binarize(sparsity=0.5)
    engine = duo_compile.compile(model, masks, sink_size=64, recent_size=256, max_seq_len=131072)
    out = engine.generate(input_ids, max_new_tokens=64)
    duo_compile.export(engine, "model.pt2"); engine2 = duo_compile.load("model.pt2")
    gates = duo_compile.identify(model, tokenizer)   # the paper's head identification -> HeadMasks
"""
from duo_compile._checkout import keep_site_kernels

keep_site_kernels()
from duo_compile.kernels import ops as _ops  # noqa: F401  (registers the duo:: ops)
from duo_compile.masks import HeadMasks, KVCacheBytes, kv_cache_bytes
from duo_compile.compiler import compile
from duo_compile.runtime.engine import Engine, EngineConfig
from duo_compile.export import export, load
from duo_compile.identify import identify

__all__ = [
    "HeadMasks", "KVCacheBytes", "kv_cache_bytes", "compile", "Engine", "EngineConfig", "export", "load", "identify",
]
__version__ = "0.1.0"
