"""A short GPU check of the inductor backend and engine packages on a tiny Llama (tests/tiny_models.py: fp32,
3 layers, mixed masks): the Inductor engine's greedy tokens equal the eager engine's; exported as a package and
loaded in a fresh process (empty Inductor and Triton cache folders) it gives the same tokens from the package's
compiled graphs, compiling none, and a server's scheduler on it (warm-up, two requests at once) compiles none
either and gives each request its ``generate`` tokens. Prints one JSON line; exit status 1 if a check fails.

    python benchmarks/package_check.py          (a GPU; run_on_gpu.sh package-check, well under a minute)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW = 16


def _engine(backend: str):
    import duo_compile  # first: the checkout's kernels/ must not shadow transformers' kernels
    from tests.tiny_models import mixed_masks, tiny_model

    model = tiny_model("llama", True).to("cuda")
    return duo_compile.compile(model, mixed_masks(model), sink_size=4, recent_size=8, max_seq_len=256,
                               backend=backend)


def _ids():
    import torch

    return torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()


def child(package: str) -> dict:
    import time

    import duo_compile

    began = time.perf_counter()
    engine = duo_compile.load(package)
    loaded = time.perf_counter() - began
    tokens = engine.generate(_ids(), max_new_tokens=NEW)[0].tolist()
    result = {"tokens": tokens, "load_s": loaded, "compiled_here": engine._run.compiled,
              "held": engine._run.held, "cache_loaded": engine.compile_cache_loaded}
    result["served"] = _serve(engine)
    return result


def _serve(engine) -> dict:
    """A server's scheduler on the loaded engine (two slots, CUDA-graph decodes of two rows): its warm-up, then two
    requests at once; the graphs compiled for it and whether each request got its ``generate`` tokens."""
    import torch

    from duo_compile.serve.scheduler import Scheduler
    from duo_compile.serve.sequence import Sequence
    from duo_compile.serve.warm_up import warm_up

    before = engine._run.compiled
    prompts = torch.randint(0, 96, (2, 33), generator=torch.Generator().manual_seed(2)).tolist()
    alone = [engine.generate(torch.tensor([p], device=engine.device), max_new_tokens=NEW)[0, len(p):].tolist()
             for p in prompts]
    scheduler = Scheduler(engine, 2)
    warm_up(scheduler)
    served = [Sequence.from_generate_args(engine, p, max_new_tokens=NEW) for p in prompts]
    for seq in served:
        scheduler.add(seq)
    while scheduler.has_work():
        scheduler.step()
    return {"compiled": engine._run.compiled - before, "equal_alone": [list(s.tokens) for s in served] == alone}


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
    served = loaded["served"]
    ok = (result["inductor_equals_eager"] and result["loaded_equals_compiled"] and loaded["compiled_here"] == 0
          and served["compiled"] == 0 and served["equal_alone"])
    print(json.dumps({**result, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
