"""Compile every duo Triton kernel for Hopper (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not whether they compile: a
construct the interpreter accepts can still fail in the GPU compiler, and CI has no GPU. Triton ships its own
``ptxas``, so ``triton.compile`` can lower each kernel to a cubin for ``GPUTarget("cuda", 90, 32)`` here. The
tile shapes come from the launchers' own config functions (tuning.py: ``prefill_config``, ``decode_config``),
asked for a CUDA tensor, so the check compiles what the GPU would run. Must run without ``TRITON_INTERPRET``
(under it the kernels are not compilable objects); tests/test_compile_sm90.py runs it in a subprocess.

    python -m duo_compile.kernels.compile_check      # prints one line per kernel, exits 1 on any failure
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton_common import dot_precision
from .triton_decode import combine_kernel, retrieval_split_kernel
from .triton_gemv import gemv_config, gemv_kernel
from .triton_mixed_decode import mixed_decode_kernel
from .triton_rope import rope_kernel
from .triton_retrieval import retrieval_prefill_kernel
from .triton_streaming import streaming_kernel, streaming_write_kernel
from .triton_streaming_decode import streaming_decode_split_kernel
from .tuning import COMBINE_BLOCK_D, TileConfig, decode_config, prefill_config

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_BYTES = 232448  # shared memory one block may use on sm_90 (227 KB); more fails only at launch
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _cuda_q(heads: int, tokens: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> SimpleNamespace:
    """What the config functions read from q (shape, dtype and device), without allocating on a GPU."""
    return SimpleNamespace(shape=(1, heads, tokens, head_dim), dtype=dtype, device=torch.device("cuda"))


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Pointer arguments as given, constexprs as such, ``qk_scale`` fp32, every other argument an int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def _compile(fn, pointers: dict[str, str], constexprs: dict, cfg: TileConfig | None = None) -> int:
    """Compile to an sm_90 cubin; return the shared memory the kernel needs (bytes), checked against Hopper's."""
    options = {} if cfg is None else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel = triton.compile(ASTSource(fn, _signature(fn, pointers, constexprs), constexprs=constexprs),
                            target=HOPPER, options=options)
    shared = int(kernel.metadata.shared)
    if shared > HOPPER_SHARED_BYTES:
        raise ValueError(f"needs {shared} bytes of shared memory, sm_90 has {HOPPER_SHARED_BYTES}")
    return shared


def kernel_cases(dtype: torch.dtype, head_dim: int) -> list[tuple[str, object, dict, dict, TileConfig | None]]:
    """(label, kernel, pointer types, constexprs, launch config) for each kernel as the launchers use it, for
    Llama-3-like heads (32 query / 8 KV heads)."""
    ptr, i64, f32 = _PTR[dtype], "*i64", "*fp32"
    groups, dot = 4, dot_precision(dtype)
    attn = dict(Q=ptr, K=ptr, V=ptr, KC=ptr, VC=ptr, O=ptr, POS=i64, VALID=i64)  # per-row starts / real counts
    # Decode kernels as the engine runs them: RoPE fused (fuse_rope), so the rotated loads are in the check.
    split = dict(Q=ptr, K=ptr, V=ptr, KC=ptr, VC=ptr, POS=i64, VALID=i64, OP=f32, LP=f32, COS=ptr, SIN=ptr,
                 TABLE="*i32")  # TABLE: the block table of paged retrieval pools
    cases = []
    retrieval = prefill_config(_cuda_q(32, 4096, head_dim, dtype), "retrieval")
    for has_cache, tma, paged in ((False, False, False), (False, True, False), (True, False, False),
                                  (True, True, False), (True, False, True)):
        # TMA both ways: the launcher falls back to pointer loads for unaligned tensors; paged pools never use it
        box = f"tensordesc<{ptr[1:]}[1, 1, {retrieval.block_n}, {head_dim}]>" if tma else ptr
        cases.append((f"retrieval prefill cache={has_cache} tma={tma} paged={paged}", retrieval_prefill_kernel,
                      dict(attn, DK=box, DV=box, DKC=box, DVC=box, TABLE="*i32"),
                      dict(HAS_CACHE=has_cache, HEADS_PER=1, BLOCK_T=retrieval.block_t,
                           BLOCK_N=retrieval.block_n, D=head_dim, DOT_PRECISION=dot, TMA=tma,
                           BLOCKS_FIRST=retrieval.blocks_first, PAGED=paged), retrieval))
    streaming = prefill_config(_cuda_q(32, 4096, head_dim), "streaming")
    decode = decode_config(_cuda_q(32, 1, head_dim), groups)
    for label, cfg, fuse_write in (("prefill", streaming, False), ("decode", decode, True)):
        for chunk_mode in (False, True):
            cases.append((f"streaming {label} chunk_mode={chunk_mode}", streaming_kernel, attn,
                          dict(HAS_CACHE=True, CHUNK_MODE=chunk_mode, FUSE_WRITE=fuse_write, HEADS_PER=cfg.heads_per,
                               BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, D=head_dim, DOT_PRECISION=dot), cfg))
    cases.append(("streaming ring write", streaming_write_kernel,
                  dict(K=ptr, V=ptr, KC=ptr, VC=ptr, POS=i64, VALID=i64),
                  dict(BLOCK_W=64, D=head_dim), None))
    cases.append(("streaming decode, tiled", streaming_decode_split_kernel, split,
                  dict(HEADS_PER=decode.heads_per, BLOCK_T=decode.block_t, BLOCK_N=decode.block_n, D=head_dim,
                       DOT_PRECISION=dot, ROPE=True), TileConfig(decode.block_t, decode.block_n, decode.heads_per,
                                                      decode.num_warps, num_stages=1)))
    for heads_per_kv, capacity, paged in ((groups, 65536, False), (1, 131072, False), (groups, 65536, True)):
        # GQA-packed and one-head (MHA) programs; paged pools
        cfg = decode_config(_cuda_q(heads_per_kv * 8, 1, head_dim), heads_per_kv, capacity)
        cases.append((f"retrieval decode split-K heads_per={cfg.heads_per} paged={paged}", retrieval_split_kernel,
                      split, dict(HEADS_PER=cfg.heads_per, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_B=8,
                                  D=head_dim, DOT_PRECISION=dot, ROPE=True, PAGED=paged), cfg))
    mixed = decode_config(_cuda_q(32, 1, head_dim), groups, 65536)
    for paged in (False, True):
        cases.append((f"mixed layer decode (streaming tiles + retrieval split-K) paged={paged}", mixed_decode_kernel,
                      dict(QR=ptr, KR=ptr, VR=ptr, KCR=ptr, VCR=ptr, QS=ptr, KS=ptr, VS=ptr, KCS=ptr, VCS=ptr, POS=i64,
                           VALID=i64, OP=f32, LP=f32, COS=ptr, SIN=ptr, TABLE="*i32"),
                      dict(HEADS_PER=mixed.heads_per, BLOCK_T=mixed.block_t, BLOCK_N=mixed.block_n, BLOCK_B=8,
                           STREAMING_BLOCK_N=32, D=head_dim, DOT_PRECISION=dot, ROPE=True, PAGED=paged), mixed))
    cases.append(("rope (prefill paths)", rope_kernel, dict(Q=ptr, K=ptr, COS=ptr, SIN=ptr, QO=ptr, KO=ptr),
                  dict(BLOCK_T=32, D=head_dim), None))
    cases.append(("combine (256 splits: 512K keys)", combine_kernel, dict(OP=f32, LP=f32, O=ptr, POS=i64, VALID=i64),
                  dict(SPLITS=256, D=head_dim, BLOCK_D=min(head_dim, COMBINE_BLOCK_D), BLOCK_N=64, BLOCK_B=8), None))
    gemv = gemv_config(SimpleNamespace(device=torch.device("cuda")), 4096)
    for has_bias in (False, True):
        cases.append((f"decode linear (GEMV) bias={has_bias}", gemv_kernel, dict(X=ptr, W=ptr, Bias=ptr, Y=ptr),
                      dict(HAS_BIAS=has_bias, BLOCK_M=gemv.block_t, BLOCK_N=gemv.block_n, BLOCK_K=256,
                           DOT_PRECISION=dot), gemv))
    return cases


def main(formats=((torch.bfloat16, 128), (torch.float16, 64))) -> int:
    failures = 0
    for dtype, head_dim in formats:
        for label, fn, pointers, constexprs, cfg in kernel_cases(dtype, head_dim):
            name = f"{label} ({str(dtype).removeprefix('torch.')}, head dim {head_dim})"
            t0 = time.perf_counter()
            try:
                shared = _compile(fn, pointers, constexprs, cfg)
            except Exception as error:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAILED {name}: {type(error).__name__}: {error}", flush=True)
            else:
                print(f"ok {name}: {shared // 1024} KiB shared, {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"sm_90 compile check (triton {triton.__version__}): {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
