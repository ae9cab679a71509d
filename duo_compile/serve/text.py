"""Generated tokens to text, piece by piece, as OpenAI's API returns it.

The whole text so far is decoded again at each token (a token's text can depend on its neighbours: merges,
spaces, multi-byte characters split over tokens), and only what is settled is handed out:

* the text ends at the first stop string, which is left out (OpenAI's ``stop``);
* while the request runs, the last ``len(longest stop) - 1`` characters are held back (they may be the start of
  a stop string) and so is a trailing U+FFFD (a character whose bytes are not all generated yet).

Without a tokenizer the text stays empty (the token ids are still returned).

``StopOnText`` ends a request when its text holds a stop string. It is a transformers ``StoppingCriteria`` (so
it runs where ``generate``'s criteria run, runtime/generation.py) that looks at the decoded text, as the text
above is made; transformers' own ``StopStringCriteria`` works from the vocabulary's token strings instead, which
some tokenizers (the bundled model's word-level one) cannot give it.
"""
from __future__ import annotations

import torch
from transformers.generation import StoppingCriteria


class StopOnText(StoppingCriteria):
    """True once the text of the tokens after the first ``prompt_length`` holds one of ``stops``. It decodes the
    last ``2 * longest stop + 16`` tokens only (every token but a special one has at least one character)."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, list(stops), prompt_length
        self.window = 2 * max(len(s) for s in self.stops) + 16

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            tail = row[self.prompt_length:][-self.window:].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done.append(any(stop in text for stop in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class TextStream:
    def __init__(self, tokenizer, stops: list[str] | None):
        self.tokenizer = tokenizer
        self.stops = stops or []
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0  # characters handed out so far

    def text(self, tokens: list[int]) -> str:
        """The final text of ``tokens``: decoded, cut at the first stop string."""
        if self.tokenizer is None or not tokens:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[:min(cuts)] if cuts else text

    def delta(self, tokens: list[int], finished: bool) -> str:
        """The text not handed out yet that is settled (all of it once ``finished``)."""
        text = self.text(tokens)
        end = len(text)
        if not finished:
            end -= self._hold
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece
