"""A seeded story grammar: the filler text ("the book") of the bundled passkey model.

Why a grammar rather than a real book: nothing may be downloaded, and the model must be a language model of its
filler so that streaming heads have real work. The grammar has local structure a small model can learn (word
order, verb-object agreement, paragraph protagonists with matching pronouns) but no long-range facts, so the only
thing that needs tokens far back is the passkey. Training text and the bundled ``filler.txt`` are different
samples of the same grammar (different seeds). No NATO alphabet word occurs in it.
"""
from __future__ import annotations

import random

NAMES_SHE = ("anna", "clara", "elena", "greta", "ida", "lena", "marta", "olga", "rosa", "tilda", "vera", "yara",
             "carla", "dora", "frida", "nora")
NAMES_HE = ("boris", "daniel", "felix", "hugo", "jonas", "karl", "nils", "peter", "simon", "ulrich", "walter",
            "zeno", "bruno", "emil", "gustav", "otto")
ANIMALS = ("fox", "dog", "cat", "horse", "bird", "wolf", "bear", "goat", "mouse", "owl", "crow", "sheep", "rabbit",
           "deer")
OBJECTS = ("lamp", "book", "letter", "key", "box", "cup", "coat", "ring", "map", "rope", "bell", "knife", "basket",
           "candle", "chair", "door", "window", "coin", "stone", "blanket")
PLACES = ("river", "forest", "village", "garden", "tower", "bridge", "market", "castle", "harbor", "valley", "mill",
          "church", "road", "field", "house", "kitchen", "hill", "lake", "school", "station")
FOODS = ("bread", "apple", "cheese", "soup", "wine", "milk", "fish", "honey", "cake", "plum", "pear", "egg", "tea",
         "porridge")
ADJECTIVES = ("old", "young", "small", "large", "quiet", "bright", "dark", "cold", "warm", "heavy", "pale", "green",
              "red", "blue", "white", "black", "golden", "broken", "hidden", "strange", "gentle", "tired", "happy",
              "sad", "wild", "clever", "tall", "empty", "wet", "dry", "soft", "loud", "brave", "lonely")
VERBS_OBJECT = ("carried", "found", "lost", "opened", "closed", "hid", "bought", "sold", "painted", "cleaned",
                "dropped", "mended", "wrapped", "counted")
VERBS_ANIMAL = ("fed", "chased", "followed", "watched", "called", "petted", "scared", "helped")
VERBS_FOOD = ("ate", "cooked", "baked", "shared", "tasted", "carried", "bought", "sold")
VERBS_PLACE = ("visited", "left", "crossed", "reached", "cleaned", "painted", "watched", "guarded")
VERBS_ALONE = ("slept", "waited", "laughed", "sang", "walked", "ran", "smiled", "cried", "worked", "rested",
               "listened", "danced", "prayed", "wondered")
ADVERBS = ("slowly", "quickly", "quietly", "happily", "carefully", "early", "late", "again", "alone", "together",
           "gladly", "softly")
PREPOSITIONS = ("in", "near", "behind", "across", "beside", "under", "above", "inside", "beyond", "around")
TIMES = ("in the morning", "at night", "after dinner", "before dawn", "on sunday", "every day", "in winter",
         "in the evening", "at noon", "in spring", "that summer", "the next day")
WEATHER = ("it was raining", "the wind was cold", "the sun was warm", "snow covered the ground",
           "the sky was grey", "the air was still", "fog filled the streets")
SPEECH = ("said", "whispered", "thought", "told everyone", "wrote", "believed")


class StoryGrammar:
    """Paragraphs of 4 to 8 sentences about one protagonist (name, then pronouns that agree with it)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options):
        return self.rng.choice(options)

    def noun_phrase(self, nouns) -> str:
        if self.rng.random() < 0.6:
            return f"the {self.pick(ADJECTIVES)} {self.pick(nouns)}"
        return f"the {self.pick(nouns)}"

    def place(self) -> str:
        return f"{self.pick(PREPOSITIONS)} {self.noun_phrase(PLACES)}"

    def action(self) -> str:
        """A verb phrase whose object agrees with its verb."""
        kind = self.rng.randrange(5)
        if kind == 0:
            return f"{self.pick(VERBS_OBJECT)} {self.noun_phrase(OBJECTS)}"
        if kind == 1:
            return f"{self.pick(VERBS_ANIMAL)} {self.noun_phrase(ANIMALS)}"
        if kind == 2:
            return f"{self.pick(VERBS_FOOD)} {self.noun_phrase(FOODS)}"
        if kind == 3:
            return f"{self.pick(VERBS_PLACE)} {self.noun_phrase(PLACES)}"
        return f"{self.pick(VERBS_ALONE)} {self.pick(ADVERBS)}"

    def sentence(self, subject: str, pronoun: str, other: str, name: str) -> str:
        kind = self.rng.randrange(10)
        if kind == 0:
            return f"{subject} {self.action()} {self.place()} ."
        if kind == 1:
            return f"{self.pick(TIMES)} , {pronoun} {self.action()} and {self.pick(VERBS_ALONE)} ."
        if kind == 2:
            return f"{subject} {self.pick(SPEECH)} that {self.noun_phrase(OBJECTS + ANIMALS)} was {self.pick(ADJECTIVES)} ."
        if kind == 3:
            return f"{subject} and {other} {self.pick(VERBS_ALONE)} together {self.place()} ."
        if kind == 4:
            return f"{self.pick(WEATHER)} , so {pronoun} {self.action()} ."
        if kind == 5:
            return f"{self.noun_phrase(ANIMALS)} {self.pick(VERBS_ALONE)} {self.pick(ADVERBS)} {self.place()} ."
        if kind == 6:
            return f"when {pronoun} {self.action()} , {self.noun_phrase(ANIMALS)} {self.pick(VERBS_ALONE)} ."
        if kind == 7:
            return f"{subject} {self.action()} , then {pronoun} {self.action()} ."
        if kind == 8:
            return f"{self.noun_phrase(PLACES)} was {self.pick(ADJECTIVES)} and {self.pick(ADJECTIVES)} ."
        return f"{other} {self.action()} for {name} ."

    def paragraph(self) -> str:
        she = self.rng.random() < 0.5
        name = self.pick(NAMES_SHE if she else NAMES_HE)
        other = self.pick([n for n in NAMES_SHE + NAMES_HE if n != name])
        pronoun = "she" if she else "he"
        sentences = []
        for i in range(self.rng.randint(4, 8)):
            subject = name if i == 0 or self.rng.random() < 0.4 else pronoun
            sentences.append(self.sentence(subject, pronoun, other, name))
        return " ".join(sentences)

    def text(self, num_words: int, repeat_probability: float = 0.0, repeat_lookback: int = 50) -> str:
        """Paragraphs (separated by newlines) until at least ``num_words`` whitespace-separated tokens.

        repeat_probability: chance that a paragraph repeats, word for word, a random paragraph among the last
        ``repeat_lookback`` (training text only). Why: copying earlier text is what retrieval (induction) heads do; frequent verbatim
        repeats give that mechanism a gradient everywhere, not only at the rare passkey answers, so it forms early.
        """
        paragraphs, words = [], 0
        while words < num_words:
            if paragraphs and self.rng.random() < repeat_probability:
                paragraph = self.rng.choice(paragraphs[-repeat_lookback:])
            else:
                paragraph = self.paragraph()
            paragraphs.append(paragraph)
            words += paragraph.count(" ") + 1
        return "\n".join(paragraphs) + "\n"


def generate_filler(seed: int, num_words: int, repeat_probability: float = 0.0, repeat_lookback: int = 50) -> str:
    return StoryGrammar(seed).text(num_words, repeat_probability, repeat_lookback)
