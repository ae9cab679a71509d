import time; T0=time.perf_counter()
import transformers.activations, sys, os, cProfile, pstats
import torch, duo_compile
print("imports", time.perf_counter()-T0)
prof = cProfile.Profile() if "--prof" in sys.argv else None
if prof: prof.enable()
t=time.perf_counter(); e = duo_compile.load("/tmp/prof/engine.pt2"); print("load", time.perf_counter()-t, e.load_seconds)
ids = torch.randint(0, 320, (1, 512), generator=torch.Generator().manual_seed(1))
t=time.perf_counter(); e.generate(ids, max_new_tokens=1); print("first", time.perf_counter()-t)
t=time.perf_counter(); e.generate(ids, max_new_tokens=3); print("3 tokens", time.perf_counter()-t)
if prof:
    prof.disable(); prof.dump_stats("/tmp/prof/ld.prof")
