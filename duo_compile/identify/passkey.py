"""The synthetic multi-passkey task of DuoAttention, and the small model the project bundles for it.

Why a synthetic task: head identification needs inputs whose answers can only be produced by attending to tokens
far back (the passkeys), so that a head made streaming changes the final hidden states exactly when it is a
retrieval head. The layout follows the authors' training data (``docs/design.md``, "Head identification"): a
haystack of filler text with ``num_passkeys`` needles at sorted depths in [0.05, 0.95], then for every needle a
question and its answer; the loss positions are the whole question/answer tail.

Two ways to make the tokens:
- text: a tokenizer (Hugging Face, or the bundled :class:`WordTokenizer`) encodes the authors' templates, NATO
  passkey words and the bundled filler text ``data/filler.txt`` (falls back to generated filler when the tokenizer
  cannot encode that text);
- generated: no tokenizer (e.g. random-weight test models with a tiny vocabulary): template, ordinal, passkey and
  filler tokens are disjoint sets of token ids drawn from the model's vocabulary with a fixed seed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "NATO_ALPHABET",
    "ORDINALS",
    "DATA_DIR",
    "FILLER_PATH",
    "PASSKEY_MODEL_DIR",
    "PASSKEY_GATES_DIR",
    "PasskeySample",
    "PasskeyTask",
    "WordTokenizer",
    "load_passkey_model",
    "load_passkey_gates",
]

NATO_ALPHABET = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu",
)
ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
    "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
    "twentieth",
)
# The authors' templates (brief, section 1). The needle ends with "." so that the passkey is delimited.
NEEDLE_TEMPLATE = " Remember this sequence of words, it's the {ordinal} passkey to the vault:"
NEEDLE_END = "."
QUESTION_TEMPLATE = " Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey:"
ANSWER_END = "."

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FILLER_PATH = DATA_DIR / "filler.txt"
PASSKEY_MODEL_DIR = DATA_DIR / "passkey_model"
PASSKEY_GATES_DIR = DATA_DIR / "passkey_model_gates"

# Generated mode: how many template token ids (needle: 4 around the ordinal + 1 end; question: 3 + 2 marker + 1 end).
_GENERATED_TEMPLATE_IDS = 10
_GENERATED_FILLER_TOKENS = 1 << 16


@dataclass(frozen=True)
class PasskeySample:
    """One sample: token ids and where its parts are (token indices, end exclusive)."""

    input_ids: np.ndarray  # int64 [length]
    context_length: int  # tokens before the question/answer tail (BOS, filler and needles)
    tail_start: int  # first token of the question/answer tail (== context_length)
    depths: tuple[float, ...]
    needle_spans: tuple[tuple[int, int], ...]  # whole needle sentences in the context
    passkey_spans: tuple[tuple[int, int], ...]  # the passkey tokens inside each needle
    answer_spans: tuple[tuple[int, int], ...]  # the passkey tokens of each answer in the tail
    passkeys: tuple[tuple[int, ...], ...]  # indices into the passkey alphabet

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def label_positions(self) -> np.ndarray:
        """Positions whose hidden state predicts a tail token: ``[tail_start - 1, length - 1)``.

        Why these: the distillation compares the hidden states that produce the question/answer tail (the authors'
        labels), i.e. the states one position before each labelled token.
        """
        return np.arange(self.tail_start - 1, self.length - 1)

    @property
    def answer_positions(self) -> tuple[np.ndarray, ...]:
        """Per answer: the positions whose next-token prediction is a passkey token of that answer."""
        return tuple(np.arange(start - 1, end - 1) for start, end in self.answer_spans)


@dataclass
class PasskeyTask:
    """Token pieces of the task for one vocabulary; :meth:`sample` assembles samples from them.

    Each piece is a list of token ids. ``needle_prefix[i]`` / ``question[i]`` hold the i-th ordinal.
    """

    filler: np.ndarray
    needle_prefix: list[list[int]]
    needle_end: list[int]
    question: list[list[int]]
    answer_end: list[int]
    alphabet: list[list[int]]
    bos: list[int] = field(default_factory=list)
    mode: str = "text"  # "text", "text+generated-filler" or "generated"
    filler_source: str = ""

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        num_passkeys: int,
        vocab_size: int | None = None,
        filler_text: str | None = None,
        seed: int = 0,
    ) -> PasskeyTask:
        """Encode the templates, passkey words and filler with ``tokenizer``.

        Raises ValueError when the tokenizer cannot encode the task (an unknown token, text that does not
        round-trip, or ids outside the model's ``vocab_size``): training on garbled questions would identify the
        wrong heads. Filler text that cannot be encoded is replaced by generated filler tokens instead.
        """
        if num_passkeys > len(ORDINALS):
            raise ValueError(f"num_passkeys={num_passkeys}: the text task has ordinals up to {len(ORDINALS)}")
        encode = _encoder(tokenizer, vocab_size)
        needle_prefix = [encode(NEEDLE_TEMPLATE.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        question = [encode(QUESTION_TEMPLATE.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        alphabet = [encode(" " + word) for word in NATO_ALPHABET]
        if len({tuple(a) for a in alphabet}) != len(alphabet):
            raise ValueError("the tokenizer cannot encode the task: two passkey words encode to the same tokens")
        bos_id = getattr(tokenizer, "bos_token_id", None)
        bos = [int(bos_id)] if bos_id is not None and (vocab_size is None or bos_id < vocab_size) else []
        text = filler_text if filler_text is not None else FILLER_PATH.read_text(encoding="utf-8")
        source = "filler_text argument" if filler_text is not None else f"bundled {FILLER_PATH.name}"
        mode = "text"
        try:
            filler = np.asarray(encode(text, check_roundtrip=False), dtype=np.int64)
            if filler.size < 64:
                raise ValueError(f"the filler text has only {filler.size} tokens")
        except ValueError as exc:
            used = {t for piece in [*needle_prefix, *question, *alphabet] for t in piece}
            limit = vocab_size or _tokenizer_vocab_size(tokenizer)
            specials = _special_ids(tokenizer)
            pool = np.array([t for t in range(limit) if t not in used and t not in specials], dtype=np.int64)
            filler = _markov_filler(pool, np.random.default_rng(seed), _GENERATED_FILLER_TOKENS)
            mode, source = "text+generated-filler", f"generated ({exc})"
        return cls(filler=filler, needle_prefix=needle_prefix, needle_end=encode(NEEDLE_END),
                   question=question, answer_end=encode(ANSWER_END), alphabet=alphabet, bos=bos, mode=mode,
                   filler_source=source)

    @classmethod
    def generated(
        cls, vocab_size: int, *, num_passkeys: int, seed: int = 0, exclude: Sequence[int] = ()
    ) -> PasskeyTask:
        """Disjoint random token ids for templates, ordinals, passkey alphabet and filler (a Markov chain).

        Why: a model with no tokenizer (or a vocabulary too small for text) still gets a task with the same
        structure: needles far back whose tokens are only predictable by retrieving them.
        """
        pool = np.array([t for t in range(vocab_size) if t not in set(int(e) for e in exclude)], dtype=np.int64)
        rng = np.random.default_rng(seed)
        pool = rng.permutation(pool)
        n_alpha = min(len(NATO_ALPHABET), (pool.size - _GENERATED_TEMPLATE_IDS - num_passkeys) // 2)
        n_filler = pool.size - _GENERATED_TEMPLATE_IDS - num_passkeys - n_alpha
        if n_alpha < 4 or n_filler < 8:
            raise ValueError(
                f"vocabulary of {vocab_size} tokens is too small for a generated passkey task with "
                f"{num_passkeys} passkeys (needs {_GENERATED_TEMPLATE_IDS + num_passkeys + 4 + 8} usable ids)"
            )
        t = [int(x) for x in pool[:_GENERATED_TEMPLATE_IDS]]
        ordinals = [int(x) for x in pool[_GENERATED_TEMPLATE_IDS:_GENERATED_TEMPLATE_IDS + num_passkeys]]
        start = _GENERATED_TEMPLATE_IDS + num_passkeys
        alphabet = [[int(x)] for x in pool[start:start + n_alpha]]
        filler_ids = pool[start + n_alpha:]
        return cls(
            filler=_markov_filler(filler_ids, rng, _GENERATED_FILLER_TOKENS),
            needle_prefix=[[t[0], t[1], o, t[2], t[3]] for o in ordinals],
            needle_end=[t[4]],
            question=[[t[5], t[6], o, t[2], t[3], t[7], t[8]] for o in ordinals],
            answer_end=[t[9]],
            alphabet=alphabet,
            mode="generated",
            filler_source=f"generated (Markov chain over {filler_ids.size} ids, seed {seed})",
        )

    # ------------------------------------------------------------------ sizes

    @property
    def max_passkeys(self) -> int:
        return len(self.question)

    def max_tail_length(self, num_passkeys: int, passkey_length: int) -> int:
        """Upper bound on the question/answer tail's tokens (for checking against the model's positions)."""
        longest_word = max(len(a) for a in self.alphabet)
        answers = num_passkeys * (passkey_length * longest_word + len(self.answer_end))
        return sum(len(q) for q in self.question[:num_passkeys]) + answers

    def max_needles_length(self, num_passkeys: int, passkey_length: int) -> int:
        """Upper bound on the tokens of BOS plus all needles (the context must be longer)."""
        longest_word = max(len(a) for a in self.alphabet)
        needles = sum(len(p) for p in self.needle_prefix[:num_passkeys])
        return len(self.bos) + needles + num_passkeys * (passkey_length * longest_word + len(self.needle_end))

    # ------------------------------------------------------------------ samples

    def sample(
        self,
        rng: np.random.Generator,
        context_length: int,
        *,
        num_passkeys: int,
        passkey_length: int,
        depths: Sequence[float] | None = None,
    ) -> PasskeySample:
        """A sample with ``context_length`` tokens before the tail.

        depths: one per needle in [0, 1] (sorted here); default uniform in [0.05, 0.95] as the authors.
        """
        if not 1 <= num_passkeys <= self.max_passkeys:
            raise ValueError(f"num_passkeys must be in [1, {self.max_passkeys}] for this task, got {num_passkeys}")
        if passkey_length < 1:
            raise ValueError(f"passkey_length must be >= 1, got {passkey_length}")
        if depths is None:
            depths = np.sort(rng.uniform(0.05, 0.95, size=num_passkeys))
        depths = np.sort(np.asarray(depths, dtype=np.float64))
        if depths.shape != (num_passkeys,) or not np.all((depths >= 0) & (depths <= 1)):
            raise ValueError(f"need {num_passkeys} depths in [0, 1], got {depths.tolist()}")
        passkeys = rng.integers(0, len(self.alphabet), size=(num_passkeys, passkey_length))
        needles, passkey_tokens = [], []
        for i in range(num_passkeys):
            words = [t for w in passkeys[i] for t in self.alphabet[w]]
            passkey_tokens.append(words)
            needles.append(self.needle_prefix[i] + words + self.needle_end)
        filler_length = context_length - len(self.bos) - sum(len(n) for n in needles)
        if filler_length < 1:
            raise ValueError(
                f"context_length={context_length} is too short for {num_passkeys} needles of {passkey_length} "
                f"words (they take {context_length - filler_length} tokens)"
            )
        start = int(rng.integers(0, self.filler.size))
        filler = np.take(self.filler, np.arange(start, start + filler_length), mode="wrap")
        cuts = np.round(depths * filler_length).astype(np.int64)
        pieces: list[np.ndarray] = [np.asarray(self.bos, dtype=np.int64)]
        needle_spans, passkey_spans = [], []
        position, previous = len(self.bos), 0
        for i, cut in enumerate(cuts):
            pieces.append(filler[previous:cut])
            position += int(cut - previous)
            previous = int(cut)
            needle_spans.append((position, position + len(needles[i])))
            key_start = position + len(self.needle_prefix[i])
            passkey_spans.append((key_start, key_start + len(passkey_tokens[i])))
            pieces.append(np.asarray(needles[i], dtype=np.int64))
            position += len(needles[i])
        pieces.append(filler[previous:])
        position += filler_length - previous
        tail_start = position
        answer_spans = []
        for i in range(num_passkeys):
            position += len(self.question[i])
            answer_spans.append((position, position + len(passkey_tokens[i])))
            tail = self.question[i] + passkey_tokens[i] + self.answer_end
            pieces.append(np.asarray(tail, dtype=np.int64))
            position += len(passkey_tokens[i]) + len(self.answer_end)
        input_ids = np.concatenate(pieces)
        assert input_ids.shape[0] == position and tail_start == context_length
        return PasskeySample(
            input_ids=input_ids, context_length=int(context_length), tail_start=int(tail_start),
            depths=tuple(float(d) for d in depths), needle_spans=tuple(needle_spans),
            passkey_spans=tuple(passkey_spans), answer_spans=tuple(answer_spans),
            passkeys=tuple(tuple(int(w) for w in p) for p in passkeys),
        )


def _markov_filler(ids: np.ndarray, rng: np.random.Generator, length: int) -> np.ndarray:
    """Filler with some local structure (each token has 4 likely successors), so that it is language-like."""
    ids = np.asarray(ids, dtype=np.int64)
    successors = rng.integers(0, ids.size, size=(ids.size, 4))
    out = np.empty(length, dtype=np.int64)
    state = int(rng.integers(0, ids.size))
    jumps = rng.random(length) < 0.2
    picks = rng.integers(0, 4, size=length)
    randoms = rng.integers(0, ids.size, size=length)
    for i in range(length):
        out[i] = ids[state]
        state = int(randoms[i]) if jumps[i] else int(successors[state, picks[i]])
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def _tokenizer_vocab_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


def _encoder(tokenizer: Any, vocab_size: int | None):
    """``encode(text) -> list[int]`` that raises ValueError when ``tokenizer`` cannot encode ``text``."""
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no encode/decode: pass a Hugging Face "
                         f"tokenizer, a duo_compile WordTokenizer, or None for generated tokens")
    unk = getattr(tokenizer, "unk_token_id", None)

    def encode(text: str, check_roundtrip: bool = True) -> list[int]:
        ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
        if not ids:
            raise ValueError(f"the tokenizer cannot encode the task: {text[:60]!r} gives no tokens")
        if unk is not None and unk in ids:
            raise ValueError(f"the tokenizer cannot encode the task: {text[:60]!r} contains unknown tokens")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"the tokenizer cannot encode the task for this model: {text[:60]!r} gives token id "
                             f"{max(ids)} >= the model's vocab_size {vocab_size}")
        if check_roundtrip:
            decoded = tokenizer.decode(ids)
            if "".join(decoded.split()) != "".join(text.split()):
                raise ValueError(f"the tokenizer cannot encode the task: {text!r} decodes back as {decoded!r}")
        return ids

    return encode


# ---------------------------------------------------------------------- the bundled word tokenizer


class WordTokenizer:
    """Word-level tokenizer of the bundled passkey model: one id per word or punctuation mark.

    Why not BPE: the bundled model is tiny and trained from scratch in minutes; a word vocabulary of a few hundred
    entries (filler grammar, task templates, NATO words) makes every passkey word one token and every context
    length a word count. Whitespace is not encoded (decode joins tokens with spaces).
    Implements the subset of the Hugging Face tokenizer API that the project uses.
    """

    _PATTERN = re.compile(r"\w+|[^\w\s]")
    FILE_NAME = "tokenizer.json"

    def __init__(self, vocab: Sequence[str], *, pad_token: str = "<pad>", bos_token: str = "<s>",
                 eos_token: str = "</s>", unk_token: str = "<unk>") -> None:
        self.vocab = list(vocab)
        self._ids = {token: i for i, token in enumerate(self.vocab)}
        if len(self._ids) != len(self.vocab):
            raise ValueError("WordTokenizer vocabulary has duplicate tokens")
        for token in (pad_token, bos_token, eos_token, unk_token):
            if token not in self._ids:
                raise ValueError(f"special token {token!r} missing from the vocabulary")
        self.pad_token, self.bos_token, self.eos_token, self.unk_token = pad_token, bos_token, eos_token, unk_token
        self.pad_token_id, self.bos_token_id = self._ids[pad_token], self._ids[bos_token]
        self.eos_token_id, self.unk_token_id = self._ids[eos_token], self._ids[unk_token]

    @classmethod
    def build(cls, texts: Sequence[str]) -> WordTokenizer:
        """Vocabulary: the 4 specials, then every token of ``texts`` in sorted order (deterministic)."""
        tokens = sorted({t for text in texts for t in cls._PATTERN.findall(text)})
        return cls(["<pad>", "<s>", "</s>", "<unk>", *tokens])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def tokenize(self, text: str) -> list[str]:
        return self._PATTERN.findall(text)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._ids.get(tokens, self.unk_token_id)
        return [self._ids.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self.vocab[int(ids)]
        return [self.vocab[int(i)] for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return " ".join(self.vocab[int(i)] for i in ids if not (skip_special_tokens and int(i) in specials))

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if return_tensors == "pt":
            if len({len(i) for i in ids}) != 1:
                raise ValueError("WordTokenizer does not pad: give texts of equal token length")
            input_ids = torch.tensor(ids, dtype=torch.long)
            return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        data = {"type": "duo_compile.WordTokenizer", "pattern": self._PATTERN.pattern, "vocab": self.vocab,
                "special_tokens": {"pad_token": self.pad_token, "bos_token": self.bos_token,
                                   "eos_token": self.eos_token, "unk_token": self.unk_token}}
        with open(os.path.join(directory, self.FILE_NAME), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=0, ensure_ascii=False)
            f.write("\n")

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (a ``tokenizers`` WordLevel model: split
        on whitespace, then into words and punctuation marks by the same pattern; ``<s>`` first; decode joins tokens
        with spaces). Its ``save_pretrained`` writes files ``AutoTokenizer`` (and ``duo-compile compile``) load; the
        bundled ``tokenizer.json`` is this class's own format, which transformers cannot read."""
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel(self.get_vocab(), unk_token=self.unk_token))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(self._PATTERN.pattern), behavior="isolated"),
        ])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A", special_tokens=[(self.bos_token, self.bos_token_id)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=self.bos_token, eos_token=self.eos_token,
                                       unk_token=self.unk_token, pad_token=self.pad_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> WordTokenizer:
        """Load from a folder holding ``tokenizer.json`` or from the file itself."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE_NAME
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("type") != "duo_compile.WordTokenizer":
            raise ValueError(f"{path} is not a duo_compile WordTokenizer file")
        return cls(data["vocab"], **data["special_tokens"])


# ---------------------------------------------------------------------- the bundled model


def load_passkey_model(directory: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, WordTokenizer]:
    """The bundled long-context Llama model (trained by ``scripts/train_passkey_model.py``) and its tokenizer.

    Its weights are stored in bf16 and upcast to ``dtype``; attention is "sdpa".
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory) if directory is not None else PASSKEY_MODEL_DIR
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(f"no bundled passkey model at {directory} (model.safetensors missing)")
    config = LlamaConfig.from_json_file(str(directory / "config.json"))
    config._attn_implementation = "sdpa"
    torch_state = torch.random.get_rng_state()
    model = LlamaForCausalLM(config)  # a 4M-parameter init is cheap; every weight is overwritten below
    torch.random.set_rng_state(torch_state)
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory / 'model.safetensors'} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(device=device, dtype=dtype).eval()
    return model, WordTokenizer.from_pretrained(directory)


def load_passkey_gates(directory: str | os.PathLike | None = None):
    """The identified gates of the bundled model (``full_attention_heads.tsv``) as HeadMasks."""
    from duo_compile.masks import HeadMasks

    directory = Path(directory) if directory is not None else PASSKEY_GATES_DIR
    return HeadMasks.from_tsv(directory / "full_attention_heads.tsv")
