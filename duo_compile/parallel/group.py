"""The process group behind ``compile(..., tensor_parallel_size=N)``: its checks and the few collectives outside
the graph.

Inside the graph the ranks meet only at the all-reduces the ``tensor_parallel`` pass inserts. Outside it:
``check_group`` checks the default process group before any work; ``check_same`` (an all-gather of digests) refuses
ranks that were given different models, masks or arguments, since every rank must capture the same model for the
shards to fit together; ``from_rank0`` and ``broadcast_tokens`` let ``generate`` run on rank 0's inputs and
return the same tokens on every rank.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from duo_compile.checks import check_int
from duo_compile.masks import HeadMasks
from duo_compile.models.hf import ModelInfo
from duo_compile.parallel.placement import (
    Placement,
    balanced_placement,
    natural_placement,
)

PLACEMENTS = {"balanced": balanced_placement, "natural": natural_placement}

__all__ = [
    "TensorParallel",
    "broadcast_tokens",
    "check_divisible",
    "check_group",
    "check_same",
    "from_rank0",
    "model_digest",
]


@dataclass(frozen=True)
class TensorParallel:
    """This rank's share of a tensor-parallel engine: ``size`` ranks of the default process group (named
    ``group_name`` in the graph's collectives), ``placement[layer][rank]`` the model's KV heads each rank holds."""

    size: int
    rank: int
    group_name: str
    placement: Placement

    @classmethod
    def create(cls, size: int, retrieval: np.ndarray, placement: str = "balanced") -> TensorParallel:
        """This rank of the default process group (of ``size`` ranks), with the ``placement`` (a key of
        ``PLACEMENTS``) of the binary masks ``retrieval`` (bool ``[layers, kv_heads]``)."""
        return cls(size, dist.get_rank(), dist.group.WORLD.group_name, PLACEMENTS[placement](retrieval, size))

    def heads(self, layer: int) -> list[int]:
        """This rank's KV heads in ``layer`` (model indices, retrieval first)."""
        return self.placement[layer][self.rank]

    def local_info(self, info: ModelInfo) -> ModelInfo:
        """The model's shape as this rank holds it (its share of the query and KV heads)."""
        return dataclasses.replace(info, num_heads=info.num_heads // self.size,
                                   num_kv_heads=info.num_kv_heads // self.size)

    def local_masks(self, masks: HeadMasks) -> HeadMasks:
        """The masks of this rank's KV heads, ``[layers, kv_heads / size]``, in the model's head order."""
        return HeadMasks(np.stack([masks.gates[layer, sorted(self.heads(layer))]
                                   for layer in range(masks.num_layers)]))


def check_group(size, device: torch.device | None = None) -> int:
    """Check ``tensor_parallel_size`` against the default process group and return it (1 needs no group); on CUDA
    the model must be on the rank's current device (what NCCL's object collectives use)."""
    size = check_int("tensor_parallel_size", size, 1)
    if size == 1:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"tensor_parallel_size={size} needs an initialised default process group of {size} ranks: launch with "
            f"`torchrun --nproc-per-node {size} ...` and call torch.distributed.init_process_group() before compile"
        )
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"tensor_parallel_size={size} but the default process group has {world} ranks; they must "
                         f"be equal")
    if device is not None and device.type == "cuda" and device.index != torch.cuda.current_device():
        raise ValueError(f"rank {dist.get_rank()}'s model is on {device} but its current CUDA device is "
                         f"cuda:{torch.cuda.current_device()}: call torch.cuda.set_device(LOCAL_RANK) and put the "
                         f"model there")
    return size


def check_divisible(size: int, **counts: int) -> None:
    """Every count (query heads, KV heads, MLP width) must split evenly over the ranks."""
    for name, count in counts.items():
        if count and count % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the model's {name}={count}")


def _integer_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its element size (sums of them are exact and order independent)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(ints[t.element_size()]) if t.is_floating_point() or t.is_complex() else t


def model_digest(model: torch.nn.Module) -> str:
    """A digest of the model's config and tensors: names, shapes, dtypes, the exact integer sum of each tensor's
    bits and a strided sample of them (about 4096 elements), so two ranks given different weights (another
    checkpoint, another seed, an edited layer) disagree, at the cost of one read of the weights."""
    h = hashlib.sha256(repr(getattr(model, "config", None)).encode())
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named:
        bits = _integer_view(tensor).flatten()
        sample = bits[:: max(1, bits.numel() // 4096)]
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{int(bits.sum(dtype=torch.int64))}|".encode())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()


def check_same(**digests: str) -> None:
    """All-gather each rank's digests; if any rank's differ from rank 0's, every rank raises the same ValueError
    naming the ranks and what differs (so no rank goes on to wait for the others in a collective)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    differ = [(rank, [k for k in digests if theirs.get(k) != gathered[0].get(k)])
              for rank, theirs in enumerate(gathered)]
    differ = [(rank, keys) for rank, keys in differ if keys]
    if differ:
        detail = "; ".join(f"rank {rank}: {', '.join(keys)}" for rank, keys in differ)
        raise ValueError(f"tensor-parallel ranks were given different inputs (differing from rank 0: {detail}); "
                         f"every rank must pass the same model, masks and arguments")


def from_rank0(*tensors: torch.Tensor | None, device: torch.device) -> list[torch.Tensor | None]:
    """Rank 0's tensors (or Nones) on every rank, moved to ``device``; what other ranks passed is ignored."""
    payload = [[None if t is None else t.detach().cpu() for t in tensors] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(payload, src=0, device=device if device.type == "cuda" else None)
    return [None if t is None else t.to(device) for t in payload[0]]


def broadcast_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's tokens on every rank: greedy or sampled, rank 0 decides each step, so the ranks never diverge
    (not even on ties or where their arithmetic differs) and stop at the same step."""
    tokens = tokens.contiguous()
    dist.broadcast(tokens, src=0)
    return tokens
