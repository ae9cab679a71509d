"""What an engine file carries for generation besides the graphs: the generation defaults and the tokenizer.

Two optional metadata entries (absent or null in files written without them; readers that do not know them
ignore them, so the format version is unchanged):

  generation_config   ``engine.generation_config`` as transformers writes generation_config.json (only the
                      values that differ from the defaults), or null
  tokenizer           ``engine.tokenizer`` as the files ``save_pretrained`` writes (tokenizer.json,
                      tokenizer_config.json, chat_template.jinja, ...): ``{name: {"text": ...}}``, or
                      ``{"base64": ...}`` for a binary file such as a sentencepiece model; or null

``load`` restores both: ``engine.generation_config`` (``GenerationConfig.from_dict``) and ``engine.tokenizer``
(``AutoTokenizer`` from those files in a temporary folder, no network, no remote code).
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
import warnings
from typing import Any


def generation_metadata(engine) -> dict[str, Any]:
    """The two entries for ``engine`` (to merge into the engine file's metadata)."""
    config = getattr(engine, "generation_config", None)
    return {
        "generation_config": json.loads(config.to_json_string(use_diff=True)) if config is not None else None,
        "tokenizer": _tokenizer_files(getattr(engine, "tokenizer", None)),
    }


def attach_generation_metadata(engine, meta: dict[str, Any], path: str):
    """Set ``engine.generation_config`` and ``engine.tokenizer`` from a file's metadata; returns ``engine``."""
    config = meta.get("generation_config")
    if config is not None:
        from transformers import GenerationConfig

        engine.generation_config = GenerationConfig.from_dict(config)
    files = meta.get("tokenizer")
    if files:
        engine.tokenizer = _load_tokenizer(files, path)
    return engine


def _tokenizer_files(tokenizer) -> dict[str, dict[str, str]] | None:
    if tokenizer is None:
        return None
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        warnings.warn(
            f"the engine's tokenizer is a {type(tokenizer).__name__}, not a transformers tokenizer: the engine file "
            f"is written without it",
            stacklevel=3,
        )
        return None
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for root, _, names in os.walk(folder):
            for name in names:
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    data = f.read()
                key = os.path.relpath(full, folder).replace(os.sep, "/")
                try:
                    files[key] = {"text": data.decode("utf-8")}
                except UnicodeDecodeError:
                    files[key] = {"base64": base64.b64encode(data).decode("ascii")}
    return dict(sorted(files.items()))


def _load_tokenizer(files: dict[str, dict[str, str]], path: str):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        for key, entry in files.items():
            target = os.path.normpath(os.path.join(folder, key))
            if os.path.isabs(key) or not target.startswith(folder + os.sep):
                from duo_compile.export.engine_file import EngineFileError

                raise EngineFileError(f"{path}: damaged engine metadata (tokenizer file name {key!r})")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            data = entry["text"].encode("utf-8") if "text" in entry else base64.b64decode(entry["base64"])
            with open(target, "wb") as f:
                f.write(data)
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # e.g. a tokenizer class that needs remote code: the engine still runs on ids
            warnings.warn(f"{path}: the engine file's tokenizer could not be loaded ({type(err).__name__}: {err}); "
                          f"engine.tokenizer is None", stacklevel=3)
            return None
