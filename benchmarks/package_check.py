"""A short GPU check of the inductor backend and engine packages on a tiny Llama (fp32, 2 layers, mixed masks):
the Inductor engine's greedy tokens equal the eager engine's; exported as a package and loaded in a fresh process
(empty Inductor and Triton cache folders) it gives the same tokens from the package's compiled graphs, compiling
none. Prints one JSON line; exit status 1 if a check fails.

    python benchmarks/package_check.py          (a GPU; run_on_gpu.sh package-check, well under a minute)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder's kernels.py would shadow the ``kernels`` distribution transformers imports

NEW = 16


def _engine(backend: str):
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import duo_compile

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().cuda()
    model.generation_config.eos_token_id = None
    masks = duo_compile.HeadMasks.from_gates(np.array([[1.0, 0.0], [0.0, 1.0]]))
    return duo_compile.compile(model, masks, sink_size=4, recent_size=8, max_seq_len=256, backend=backend)


def _ids():
    import torch

    return torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()


def child(package: str) -> dict:
    import time

    import duo_compile

    began = time.perf_counter()
    engine = duo_compile.load(package)
    loaded = time.perf_counter() - began
    tokens = engine.generate(_ids(), max_new_tokens=NEW)[0].tolist()
    return {"tokens": tokens, "load_s": loaded, "compiled_here": engine._run.compiled,
            "held": len(engine._run.variants), "cache_loaded": engine.compile_cache_loaded}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        return 0
    import duo_compile

    eager = _engine("eager").generate(_ids(), max_new_tokens=NEW)[0].tolist()
    engine = _engine("inductor")
    compiled = engine.generate(_ids(), max_new_tokens=NEW)[0].tolist()
    work = tempfile.mkdtemp()
    package = os.path.join(work, "tiny.pt2")
    duo_compile.export(engine, package, backend="package")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(work, "inductor"),
               TRITON_CACHE_DIR=os.path.join(work, "triton"))
    proc = subprocess.run([sys.executable, __file__, "--child", package], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"inductor_equals_eager": compiled == eager, "loaded_equals_compiled": loaded["tokens"] == compiled,
              "loaded": {k: v for k, v in loaded.items() if k != "tokens"}}
    ok = result["inductor_equals_eager"] and result["loaded_equals_compiled"] and loaded["compiled_here"] == 0
    print(json.dumps({**result, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
