"""Which compiled Triton files an engine package would carry from this process (export/package_triton.py): a tiny
Llama engine on the GPU generates a few tokens (the attention ops' Triton kernels compile), then the kernel folders
and the Triton host modules (launchers, driver utilities) the collector finds are listed with their files.

    python benchmarks/triton_pack_check.py        (a GPU; run_on_gpu.sh triton-pack-check, well under a minute)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    import duo_compile  # noqa: F401  (first: the checkout's kernels/ must not shadow transformers' kernels)
    from duo_compile.export import package_triton
    from tests.tiny_models import mixed_masks, tiny_model

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    model = tiny_model("llama", True).to("cuda")
    engine = duo_compile.compile(model, mixed_masks(model), sink_size=4, recent_size=8, max_seq_len=96,
                                 backend="eager")
    engine.generate(torch.randint(0, 96, (1, 40), device="cuda"), max_new_tokens=3)
    folders = package_triton.compiled_folders()
    kinds = {"kernel": 0, "host module": 0}
    for folder in folders:
        files = sorted(os.listdir(folder))
        kind = "host module" if any(f.endswith(".so") for f in files) else "kernel"
        kinds[kind] += 1
        print(f"{kind:12s} {os.path.basename(folder)[:16]} {files}")
    packed = package_triton.pack(folders)
    print(f"folders: {kinds}; packed {len(packed)} files, {sum(map(len, packed.values()))} bytes")
    return 0 if kinds["kernel"] else 1


if __name__ == "__main__":
    sys.exit(main())
