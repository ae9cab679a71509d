"""Padded batches: what ``Engine.generate`` does with an ``attention_mask`` that has zeros.

A batch of prompts of different lengths comes padded, as Hugging Face tokenizers pad it: on the left
(``padding_side="left"``, the convention for decoder-only generation) or on the right. The engine runs every row
as if it were alone:

* every row's real tokens sit at positions ``0 .. n_b - 1`` (``position_ids`` as Hugging Face computes them from
  the mask, ``cumsum - 1``), whatever side the padding was on;
* prefill runs the batch *right-padded* (``right_aligned``): each row's real tokens first, then padding, so every
  row's chunk k starts at position ``k * chunk`` (the same chunk boundaries as the row alone), and the graph is told
  how many tokens of each row's chunk are real (``chunk_valid``); padding is never written to a cache;
* each row's next-token logits are those of its own last real token (``LastLogits`` keeps them across chunks);
* decode steps run every row at its own position ``n_b + i``.

The returned sequences keep Hugging Face's layout (the input rows as given, padding included, then the new
tokens), which ``Engine.generate`` builds from the input as before. A mask that is neither left nor right padding
(a hole between real tokens, zeros on both sides, a row with no real token) is refused before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rows:
    """Where each row's real tokens are in the input: ``offsets[b] .. offsets[b] + lengths[b] - 1`` (int64 ``[B]``
    on the input's device). ``padded`` is False for a mask of all ones (the equal-length path, unchanged)."""

    lengths: torch.Tensor
    offsets: torch.Tensor
    padded: bool

    @property
    def longest(self) -> int:
        return int(self.lengths.max())


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> Rows:
    """The real tokens of each row of ``input_ids`` under Hugging Face's ``attention_mask`` (1 real, 0 padding;
    None: no padding); ValueError, one line, for a mask of another shape, values other than 0/1, or rows that are
    not pure left or right padding (each row's ones must be one run touching the row's first or last column)."""
    shape = tuple(input_ids.shape)
    if attention_mask is None:
        attention_mask = torch.ones(shape, dtype=torch.long, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(f"attention_mask must match input_ids {shape}, got {got}")
    mask = attention_mask.to(input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    mask = mask.to(torch.long)
    lengths = mask.sum(dim=1)
    length = shape[1]
    if bool((lengths == length).all()):
        zeros = torch.zeros_like(lengths)
        return Rows(lengths, zeros, padded=False)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask row {empty[0]} has no real token (all zeros); every row needs a prompt")
    first = mask.argmax(dim=1)  # first real token of each row
    cols = torch.arange(length, device=mask.device)
    run = (cols[None, :] >= first[:, None]) & (cols[None, :] < (first + lengths)[:, None])
    contiguous = (run.long() == mask).all(dim=1)
    left_or_right = (first == 0) | (first + lengths == length)
    bad = (~(contiguous & left_or_right)).nonzero().flatten().tolist()
    if bad:
        row = mask[bad[0]].tolist()
        raise ValueError(
            f"attention_mask row {bad[0]} is not left or right padding ({_short(row)}): each row's real tokens (1) "
            f"must be one run at its start (right padding) or at its end (left padding)"
        )
    return Rows(lengths, first, padded=True)


def _short(row: list[int]) -> str:
    text = "".join(str(v) for v in row)
    return text if len(text) <= 48 else f"{text[:22]}...{text[-22:]}"


def check_real_tokens(input_ids: torch.Tensor, rows: Rows, vocab_size: int) -> None:
    """Every real token id must be in the vocabulary (padding ids are never fed to the model)."""
    if rows.padded:
        cols = torch.arange(input_ids.shape[1], device=input_ids.device)
        real = (cols[None, :] >= rows.offsets[:, None]) & (cols[None, :] < (rows.offsets + rows.lengths)[:, None])
        ids = input_ids[real]
    else:
        ids = input_ids
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contain token id {bad}, outside the vocabulary [0, {vocab_size})")


def right_aligned(input_ids: torch.Tensor, rows: Rows, fill: int = 0) -> torch.Tensor:
    """``[B, longest]``: each row's real tokens first (positions 0 .. n_b - 1), then ``fill`` (a valid id: padding
    runs through the model, its outputs unused and never cached). The input itself when it is not padded."""
    if not rows.padded:
        return input_ids
    cols = torch.arange(rows.longest, device=input_ids.device)
    index = (rows.offsets[:, None] + cols[None, :]).clamp(max=input_ids.shape[1] - 1)
    ids = input_ids.gather(1, index)
    return torch.where(cols[None, :] < rows.lengths[:, None], ids, torch.full_like(ids, fill))


def chunk_valid(lengths: torch.Tensor, begin: int, size: int) -> torch.Tensor:
    """How many of the ``size`` tokens from column ``begin`` of a right-padded batch are real, per row."""
    return (lengths - begin).clamp(min=0, max=size)


class LastLogits:
    """Each row's logits at its last real token, across prefill chunks: a chunk's logits (``[B, V]``, taken by the
    graph at each row's last real token of the chunk) replace a row's only where the chunk held real tokens of
    that row, so after the last chunk every row has those of its own last prompt token."""

    def __init__(self):
        self.logits: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, valid: torch.Tensor | None) -> None:
        """``valid`` None: every row's chunk was all real (an unpadded batch), so the chunk's logits replace all."""
        if self.logits is None or valid is None:
            self.logits = logits
        else:
            self.logits = torch.where((valid > 0).to(logits.device)[:, None], logits, self.logits)
