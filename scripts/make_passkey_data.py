"""Write the bundled filler text and the word tokenizer of the passkey model (deterministic, seeded).

    python scripts/make_passkey_data.py

Writes ``duo_compile/data/filler.txt`` (the book the identification and the needle study take their haystack from;
seed 1) and ``duo_compile/data/passkey_model/tokenizer.json`` (every token of the grammar, the task's templates,
the NATO alphabet and the ordinals). The model itself is trained by ``scripts/train_passkey_model.py`` on text of
the same grammar with another seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from filler_grammar import generate_filler  # noqa: E402

from duo_compile.identify.passkey import (  # noqa: E402
    ANSWER_END, FILLER_PATH, NATO_ALPHABET, NEEDLE_END, NEEDLE_TEMPLATE, ORDINALS, PASSKEY_MODEL_DIR,
    QUESTION_TEMPLATE, WordTokenizer,
)

FILLER_SEED = 1
FILLER_WORDS = 120_000


def task_texts() -> list[str]:
    """Every text of the task other than the filler, so that the vocabulary covers it."""
    texts = [NEEDLE_END, ANSWER_END, " ".join(NATO_ALPHABET)]
    for ordinal in ORDINALS:
        texts += [NEEDLE_TEMPLATE.format(ordinal=ordinal), QUESTION_TEMPLATE.format(ordinal=ordinal)]
    return texts


def grammar_vocabulary_text() -> str:
    """All words the grammar can produce (a long sample covers them, this makes it certain)."""
    import filler_grammar as g

    pools = [g.NAMES_SHE, g.NAMES_HE, g.ANIMALS, g.OBJECTS, g.PLACES, g.FOODS, g.ADJECTIVES, g.VERBS_OBJECT,
             g.VERBS_ANIMAL, g.VERBS_FOOD, g.VERBS_PLACE, g.VERBS_ALONE, g.ADVERBS, g.PREPOSITIONS, g.TIMES,
             g.WEATHER, g.SPEECH]
    words = " ".join(" ".join(pool) for pool in pools)
    return words + " the and that was so when then for together she he , ."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=Path, default=FILLER_PATH)
    parser.add_argument("--tokenizer-dir", type=Path, default=PASSKEY_MODEL_DIR)
    args = parser.parse_args()
    filler = generate_filler(FILLER_SEED, FILLER_WORDS)
    args.filler.parent.mkdir(parents=True, exist_ok=True)
    args.filler.write_text(filler, encoding="utf-8")
    tokenizer = WordTokenizer.build([grammar_vocabulary_text(), *task_texts()])
    if set(NATO_ALPHABET) & set(tokenizer.tokenize(filler)):
        raise SystemExit("the filler grammar produced a NATO alphabet word")
    tokenizer.save_pretrained(args.tokenizer_dir)
    print(f"{args.filler}: {len(tokenizer.tokenize(filler))} tokens; vocabulary {tokenizer.vocab_size} tokens "
          f"-> {args.tokenizer_dir / WordTokenizer.FILE_NAME}")


if __name__ == "__main__":
    main()
