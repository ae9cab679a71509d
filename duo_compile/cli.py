"""``duo-compile``: the command line over the same calls as the Python API.

    duo-compile demo                       compile a small model with and without DuoAttention, print the savings
    duo-compile compile MODEL_DIR --masks full_attention_heads.tsv --sparsity 0.5 -o engine.pt2
    duo-compile run engine.pt2 --prompt "Once upon a time" --max-new-tokens 64 [--chat] [--do-sample --seed 0]
    duo-compile run engine.pt2 --ids 1,2,3 --max-new-tokens 16
    duo-compile identify MODEL_DIR -o gates/          head identification (the paper's gate optimisation)
    duo-compile needle                                passkey accuracy study of the bundled model
    duo-compile bench --patterns DIR --out DIR        end-to-end benchmark at Llama-2/Llama-3 shapes (GPU)
    duo-compile serve [MODEL_DIR | ENGINE_FILE] --port 8000   OpenAI-compatible server (default: the bundled model)

Errors. Every command checks all of its arguments (and, for ``compile``, the model directory's config.json and
the masks against it) before it loads a model or an engine. A user error (a bad argument or file, a full disk,
a missing GPU: ValueError, OSError and duo_compile's own RuntimeErrors) is one line on stderr,
``duo-compile <command>: error: <message>``, exit status 2; Ctrl-C is ``duo-compile <command>: interrupted``,
exit status 130. Anything else is a bug and keeps its traceback; ``DUO_COMPILE_TRACEBACK=1`` shows the traceback
of user errors too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from duo_compile import __version__

EXIT_ERROR = 2  # argparse's status for usage errors, so every refusal has the same status
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
TRACEBACK_ENV = "DUO_COMPILE_TRACEBACK"


# ------------------------------------------------------------------------------------------- argument checks
def _at_least(flag: str, value: int, minimum: int, why: str = "") -> int:
    if value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}{why}, got {value}")
    return value


def _fraction(flag: str, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"{flag} must be a number in [0, 1], got {value}")
    return value


def _device(value: str | None):
    """``--device``: a torch device that exists here (torch.device would accept 'cuda' on a machine without one)."""
    if value is None:
        return None
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"--device {value!r}: this machine has {count} CUDA GPU(s)")
    return device


def _existing_dir(flag: str, path: str | None) -> None:
    if path is not None and not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise ValueError(f"{flag} {path!r} {what}")


def _folder_to_create(flag: str, path: str) -> None:
    """A folder the command will create (with its parents) and write into: refuse what would fail later."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder (the command writes several files into it)")
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"cannot create the folder {flag} {path!r}: {ancestor!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {flag} {path!r}: permission denied on {ancestor!r}")


def _file_prefix(flag: str, prefix: str, suffixes: tuple[str, ...]) -> None:
    """``prefix`` + each suffix must be writable files in an existing folder."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {prefix!r}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {prefix!r}: permission denied on {folder!r}")
    for suffix in suffixes:
        if os.path.isdir(prefix + suffix):
            raise ValueError(f"{flag} {prefix!r}: {prefix + suffix!r} is a directory")


def _model_dir(path: str) -> None:
    if not os.path.isdir(path):  # else transformers tries the Hub and fails with an OSError about the network
        raise FileNotFoundError(f"model directory {path!r} does not exist (a local Hugging Face model directory)")


# ---------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args) -> int:
    _fraction("--sparsity", args.sparsity)
    _at_least("--sink", args.sink, 0)
    _at_least("--recent", args.recent, 1)
    _at_least("--max-seq-len", args.max_seq_len, 1)
    _at_least("--max-new-tokens", args.max_new_tokens, 0)
    from duo_compile.tools.demo import run_demo

    run_demo(sparsity=args.sparsity, sink_size=args.sink, recent_size=args.recent, backend=args.backend,
             new_tokens=args.max_new_tokens, max_seq_len=args.max_seq_len)
    return 0


# ------------------------------------------------------------------------------------------------- compile
def _load_model(path: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    _model_dir(path)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def _load_config(path: str):
    """The model directory's config.json only: what the checks need, without reading the weights."""
    from transformers import AutoConfig

    _model_dir(path)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _masks(args):
    """The --masks file's gates, as read (binarised by ``_binarize`` once the model's layers are known)."""
    from duo_compile.masks import HeadMasks

    if os.path.isdir(args.masks):
        raise ValueError(f"--masks {args.masks!r} is a directory; give the masks file in it "
                         f"(full_attention_heads.tsv: rows = layers, columns = KV heads)")
    masks = HeadMasks.from_tsv(args.masks)
    if args.sparsity is None and args.threshold is None and not masks.is_binary:
        raise ValueError("the gates in --masks are not binary: give --sparsity or --threshold")
    return masks


def _binarize(args, masks, info, max_seq_len: int):
    """``masks`` of the model ``info`` binarised by --sparsity / --threshold (unchanged without them): the
    sparsity counts the heads of full-attention layers only, the rows of layers whose sliding window is shorter
    than ``max_seq_len`` being unused by the engine."""
    masks.check_shape(info.num_layers, info.num_kv_heads)
    if args.sparsity is None and args.threshold is None:
        return masks
    return masks.binarize(sparsity=args.sparsity, threshold=args.threshold,
                          skip_layers=info.window_layers(max_seq_len))


def _check_compile(args):
    """Every check that does not need the weights: masks, sizes, backend, output path, then the model's
    config.json (attention variants it declares, RoPE, and the masks' shape). Returns (masks, max_seq_len)."""
    from duo_compile.export.engine_file import check_writable
    from duo_compile.models.hf import check_config, text_config

    masks = _masks(args)
    if args.backend == "tensorrt":
        raise ValueError("--backend tensorrt is not available here (torch-tensorrt cannot be installed); use "
                         "--backend onnx: its standard-op ONNX file is what TensorRT's ONNX parser builds from")
    _at_least("--sink", args.sink, 0)
    _at_least("--recent", args.recent, 1)
    if args.chunk is not None:
        _at_least("--chunk", args.chunk, 1)
    needs = " (an engine file takes a dynamic chunk length of 1..max-seq-len)"
    if args.max_seq_len is not None:
        _at_least("--max-seq-len", args.max_seq_len, 2, needs)
    check_writable(args.output)
    config = _load_config(args.model)
    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    max_seq_len = args.max_seq_len
    if max_seq_len is None:
        max_seq_len = getattr(text_config(config), "max_position_embeddings", None)
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"{name}'s max_position_embeddings is {max_seq_len!r}: give --max-seq-len (>= 2)")
    info = check_config(config, max_seq_len, name)
    return _binarize(args, masks, info, max_seq_len), max_seq_len
def _load_tokenizer(path: str, required: bool):
    """The tokenizer (and chat template) of a local model directory; None, with a note, if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # no tokenizer files, or files transformers cannot read: the engine then takes ids
        if required:
            raise ValueError(f"cannot load a tokenizer from {path!r} ({type(err).__name__}: {err})") from None
        print(f"note: no tokenizer loaded from {path} ({type(err).__name__}); the engine takes token ids only "
              f"(--tokenizer DIR to give one)", file=sys.stderr)
        return None


def _cmd_compile(args) -> int:
    import duo_compile

    masks, max_seq_len = _check_compile(args)  # before the (slow) model load and compile
    model = _load_model(args.model, args.dtype)
    tokenizer = None if args.no_tokenizer else _load_tokenizer(args.tokenizer or args.model, args.tokenizer is not None)
    engine = duo_compile.compile(model, masks, sink_size=args.sink, recent_size=args.recent,
                                 max_seq_len=max_seq_len, prefill_chunk_size=args.chunk,
                                 streaming_mode=args.mode, tokenizer=tokenizer,
                                 backend="inductor" if args.backend == "package" else "eager")  # what load runs
    print(engine)
    duo_compile.export(engine, args.output, backend=args.backend)
    print(f"wrote {args.output} ({args.backend}{', with its tokenizer' if tokenizer is not None else ''})")
    return 0


# ----------------------------------------------------------------------------------------------------- run
def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise ValueError(f"--ids must be integers separated by commas or spaces, got {text!r}") from err
    if not ids:
        raise ValueError(f"--ids is empty: give the prompt's token ids separated by commas or spaces (e.g. 1,2,3), "
                         f"got {text!r}")
    if min(ids) < 0:
        raise ValueError(f"--ids must be token ids >= 0, got {text!r}")
    return ids


def _prompt_ids(args, tokenizer):
    """The prompt as token ids [1, T]: --ids as given; --prompt / --file text encoded by the engine's tokenizer,
    through its chat template with --chat."""
    import torch

    if args.ids is not None:
        return torch.tensor([_parse_ids(args.ids)])
    if tokenizer is None:
        raise ValueError(f"{args.engine} has no tokenizer (compile it from a model directory that has one, or with "
                         f"--tokenizer DIR): give the prompt as --ids")
    if args.prompt is not None:
        text = args.prompt
    elif args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {args.engine} has no chat template: drop --chat")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True, return_tensors="pt")
    else:
        encoded = tokenizer(text, return_tensors="pt")
    return encoded["input_ids"]


def _cmd_run(args) -> int:
    # Every check that needs no engine comes first: the ids, the sizes, the prompt file, the flags' combination.
    if args.ids is not None:
        _parse_ids(args.ids)
    _at_least("--max-new-tokens", args.max_new_tokens, 0)
    if args.chat and args.ids is not None:
        raise ValueError("--chat applies to a text prompt (--prompt or --file), not to --ids")
    if args.file not in (None, "-") and not os.path.isfile(args.file):
        raise FileNotFoundError(f"--file {args.file!r} does not exist")
    import torch

    import duo_compile

    engine = duo_compile.load(args.engine)
    input_ids = _prompt_ids(args, engine.tokenizer).to(engine.device)
    options = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample is not None:
        options["do_sample"] = args.do_sample
    for name in ("temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # the global RNG, as for model.generate after torch.manual_seed
    if args.ids is not None:
        out = engine.generate(input_ids, **options)
        print(" ".join(str(t) for t in out[0].tolist()))
    else:  # the new text is printed as it is generated
        from transformers import TextStreamer

        streamer = TextStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        engine.generate(input_ids, streamer=streamer, **options)
    return 0


# ------------------------------------------------------------------------------------------------ identify
def _cmd_identify(args) -> int:
    _at_least("--steps", args.steps, 1)
    _at_least("--sink", args.sink, 0)
    _at_least("--recent", args.recent, 1)
    _at_least("--seed", args.seed, 0)
    if not (math.isfinite(args.reg_weight) and args.reg_weight >= 0):
        raise ValueError(f"--reg-weight must be a number >= 0, got {args.reg_weight}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a number > 0, got {args.lr}")
    device = _device(args.device)
    _folder_to_create("-o/--output", args.output)
    _existing_dir("--tokenizer", args.tokenizer)
    _model_dir(args.model)
    from duo_compile.identify import identify

    model = _load_model(args.model)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    gates = identify(model, tokenizer, num_steps=args.steps, sink_size=args.sink, recent_size=args.recent,
                     reg_weight=args.reg_weight, lr=args.lr, seed=args.seed, output_dir=args.output,
                     resume=args.resume, device=device)
    print(f"wrote {args.output}/full_attention_heads.tsv: {gates!r}")
    return 0


# -------------------------------------------------------------------------------------------------- needle
def _cmd_needle(args) -> int:
    for length in args.contexts:
        _at_least("--contexts", length, 1)
    _at_least("--samples-per-cell", args.samples_per_cell, 1)
    _at_least("--sink", args.sink, 0)
    _at_least("--recent", args.recent, 1)
    device = _device(args.device)
    _existing_dir("--model-dir", args.model_dir)
    _existing_dir("--gates-dir", args.gates_dir)
    _file_prefix("-o/--output", args.output, (".json", ".png"))
    import json

    import torch

    from duo_compile.identify.needle import needle_study, plot_needle_study
    from duo_compile.identify.passkey import load_passkey_gates, load_passkey_model

    model, tokenizer = load_passkey_model(args.model_dir, device=device)
    gates = load_passkey_gates(args.gates_dir)
    study = needle_study(model, tokenizer, gates=gates, context_lengths=args.contexts,
                         samples_per_cell=args.samples_per_cell, sink_size=args.sink, recent_size=args.recent,
                         autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    with open(f"{args.output}.json", "w") as f:
        json.dump(study, f, indent=1)
    plot_needle_study(study, f"{args.output}.png")
    print(json.dumps({"summary": study["summary"], "goals": study["goals"]}, indent=1))
    return 0


# --------------------------------------------------------------------------------------------------- bench
def _cmd_bench(args) -> int:
    from duo_compile.tools.bench import run

    return run(args)


# --------------------------------------------------------------------------------------------------- serve
def _cmd_serve(args) -> int:
    """Checks every flag, then builds the engine: the bundled model (no MODEL), a model directory with --masks,
    or an engine file; then serves it (duo_compile/serve/server.py)."""
    _at_least("--port", args.port, 0)
    if args.port > 65535:
        raise ValueError(f"--port must be an integer in 0..65535, got {args.port}")
    _at_least("--max-num-seqs", args.max_num_seqs, 1)
    _at_least("--max-waiting", args.max_waiting, 0)
    _at_least("--page-size", args.page_size, 0)
    page_size = args.page_size or None
    if args.token_budget is not None:
        _at_least("--token-budget", args.token_budget, args.max_num_seqs, " (--max-num-seqs)")
    if args.kv_cache_memory is not None and not (math.isfinite(args.kv_cache_memory) and args.kv_cache_memory > 0):
        raise ValueError(f"--kv-cache-memory must be a number of GiB > 0, got {args.kv_cache_memory}")
    if args.kv_cache_fraction is not None and not 0 < args.kv_cache_fraction <= 1:
        raise ValueError(f"--kv-cache-fraction must be a number in (0, 1], got {args.kv_cache_fraction}")
    if args.kv_cache_memory is not None and args.kv_cache_fraction is not None:
        raise ValueError("give --kv-cache-memory or --kv-cache-fraction, not both")
    _at_least("--sink", args.sink, 0)
    _at_least("--recent", args.recent, 1)
    if args.max_seq_len is not None:
        _at_least("--max-seq-len", args.max_seq_len, 2)
    if args.chunk is not None:
        _at_least("--chunk", args.chunk, 1)
    _fraction("--sparsity", args.sparsity)
    device = _device(args.device)
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"duo-compile serve needs {', '.join(missing)}: pip install 'duo_compile[serve]'")
    from duo_compile.serve import server

    if args.model is None:
        if args.masks is not None:
            raise ValueError("--masks needs a MODEL_DIR (without one the bundled model serves with its own gates)")
        engine = server.bundled_engine(sparsity=0.5 if args.sparsity is None else args.sparsity,
                                       sink_size=args.sink, recent_size=args.recent, max_seq_len=args.max_seq_len,
                                       backend=args.backend, device=device, prefill_chunk_size=args.chunk,
                                       page_size=page_size)
        name = server.BUNDLED_MODEL_NAME
    elif os.path.isfile(args.model):
        if args.masks is not None or args.sparsity is not None or args.threshold is not None:
            raise ValueError(f"{args.model!r} is an engine file: its masks are compiled in (drop --masks/--sparsity)")
        import duo_compile

        engine = duo_compile.load(args.model)
        name = os.path.splitext(os.path.basename(args.model))[0]
    else:
        _model_dir(args.model)
        if args.masks is None:
            raise ValueError("a MODEL_DIR needs --masks (full_attention_heads.tsv, as identify writes it)")
        import duo_compile

        from duo_compile.models.hf import read_shape

        masks = _masks(args)
        model = _load_model(args.model, args.dtype)
        if device is not None:
            model = model.to(device)
        info = read_shape(model)
        masks = _binarize(args, masks, info, args.max_seq_len or info.max_position_embeddings)
        engine = duo_compile.compile(model, masks, sink_size=args.sink, recent_size=args.recent,
                                     max_seq_len=args.max_seq_len, prefill_chunk_size=args.chunk,
                                     backend=args.backend, tokenizer=_load_tokenizer(args.model, False),
                                     page_size=page_size)
        name = os.path.basename(os.path.normpath(args.model))
    gib = args.kv_cache_memory
    return server.run(engine, model_name=args.served_model_name or name, host=args.host, port=args.port,
                      max_slots=args.max_num_seqs, kv_cache_memory=None if gib is None else int(gib * 2**30),
                      memory_fraction=args.kv_cache_fraction, token_budget=args.token_budget,
                      max_waiting=args.max_waiting)


# Help for the benchmark's options that tools/bench.py declares without one.
_BENCH_HELP = {
    "backend": "how the engines run: eager (op by op) or inductor (compiled by Inductor) (default: %(default)s)",
    "commit": "commit recorded with the results (default: $GIT_COMMIT, here %(default)s)",
}


# --------------------------------------------------------------------------------------------------- parser
def _sizes(p: argparse.ArgumentParser, sink: int, recent: int) -> None:
    p.add_argument("--sink", type=int, default=sink,
                   help="sink tokens (the first ones) kept by streaming heads (default: %(default)s)")
    p.add_argument("--recent", type=int, default=recent,
                   help="recent tokens kept by streaming heads (default: %(default)s)")


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option says its default: add '(default: ...)' to help that does not mention one."""
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
            continue
        help_text = action.help or _BENCH_HELP.get(action.dest) or ""  # (the tests require real help text)
        if "default" not in help_text and action.default not in (None, False):
            help_text += " (default: %(default)s)"
        action.help = help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-compile", description=__doc__.split("\n\n")[0],
        epilog=f"Errors are one line on stderr (exit status {EXIT_ERROR}; Ctrl-C: {EXIT_INTERRUPTED}); "
               f"{TRACEBACK_ENV}=1 shows their traceback.")
    parser.add_argument("--version", action="version", version=f"duo-compile {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a small model with and without DuoAttention and compare")
    _sizes(demo, 64, 256)
    demo.add_argument("--sparsity", type=float, default=0.5,
                      help="fraction of heads made streaming (default: %(default)s)")
    demo.add_argument("--max-seq-len", type=int, default=8192,
                      help="retrieval cache length, for the KV cache sizes (default: %(default)s)")
    demo.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                      help="inductor (compiled by Inductor) or eager (op by op) (default: %(default)s)")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    comp = sub.add_parser("compile", help="compile a local Hugging Face model directory and export an engine")
    comp.add_argument("model", help="a local model directory (config.json + weights)")
    comp.add_argument("--masks", required=True,
                      help="full_attention_heads.tsv (rows = layers, columns = KV heads), as identify writes it")
    comp.add_argument("-o", "--output", required=True, help="engine file to write")
    comp.add_argument("--backend", choices=("aoti", "onnx", "package", "tensorrt"), default="aoti",
                      help="engine file format: aoti (AOTInductor .pt2), onnx, or package (the program, weights and "
                           "Inductor's compiled graphs, run with Inductor on load); tensorrt is not available here "
                           "(default: %(default)s)")
    comp.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="weights and cache dtype (default: %(default)s, the model directory's)")
    comp.add_argument("--tokenizer", default=None,
                      help="tokenizer directory, saved in the engine file with its chat template (default: the "
                           "model directory)")
    comp.add_argument("--no-tokenizer", action="store_true",
                      help="write the engine without a tokenizer (default: off)")
    _sizes(comp, 64, 256)
    comp.add_argument("--sparsity", type=float, default=None,
                      help="binarise the gates: this fraction of heads made streaming (default: none, the gates "
                           "must be binary already, or give --threshold)")
    comp.add_argument("--threshold", type=float, default=None,
                      help="binarise the gates: gates above this are retrieval heads (default: none)")
    comp.add_argument("--max-seq-len", type=int, default=None,
                      help="retrieval cache length, >= 2 (default: the model's max_position_embeddings)")
    comp.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default: the whole prompt)")
    comp.add_argument("--mode", choices=("window", "chunk"), default="window",
                      help="streaming semantics: window (token-exact) or chunk (the authors' chunked prefill) "
                           "(default: %(default)s)")
    comp.set_defaults(func=_cmd_compile)

    run = sub.add_parser("run", help="load an exported engine and generate: text in, text out (streamed), or ids")
    run.add_argument("engine", help="engine file written by `duo-compile compile`")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="prompt text (needs the engine's tokenizer) (default: none)")
    prompt.add_argument("--file", default=None,
                        help="read the prompt text from this file ('-': standard input) (default: none)")
    prompt.add_argument("--ids", default=None,
                        help="prompt token ids, e.g. 1,2,3 (prints prompt + new ids) (default: none)")
    run.add_argument("--chat", action="store_true",
                     help="wrap the prompt in the tokenizer's chat template (default: off)")
    run.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    sampling = run.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                          help="sample (default: the engine's generation config, else greedy)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false",
                          help="greedy, whatever the config says (default: the engine's generation config)")
    run.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default: the engine's generation config)")
    run.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: the engine's generation config)")
    run.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling (default: the engine's generation config)")
    run.add_argument("--seed", type=int, default=None,
                     help="seed the RNG (torch.manual_seed) before generating (default: unseeded)")
    run.set_defaults(func=_cmd_run)

    ident = sub.add_parser("identify", help="identify retrieval heads of a local model (writes the authors' TSV)")
    ident.add_argument("model", help="a local model directory")
    ident.add_argument("-o", "--output", required=True,
                       help="folder for full_attention_heads.tsv, config.json, history.json, checkpoint.pt "
                            "(created if missing)")
    ident.add_argument("--tokenizer", default=None,
                       help="tokenizer directory (default: none, samples of generated filler tokens)")
    ident.add_argument("--steps", type=int, default=2000, help="optimisation steps (default: %(default)s)")
    _sizes(ident, 128, 256)
    ident.add_argument("--reg-weight", type=float, default=0.05,
                       help="weight of the mean |gate| penalty (default: %(default)s)")
    ident.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate (default: %(default)s)")
    ident.add_argument("--seed", type=int, default=42, help="seed of the samples (default: %(default)s)")
    ident.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    ident.add_argument("--device", default=None,
                       help="torch device to train on, e.g. cuda (default: where the model loads, the CPU)")
    ident.set_defaults(func=_cmd_identify)

    needle = sub.add_parser("needle", help="passkey accuracy study of the bundled model (full vs duo vs baselines)")
    needle.add_argument("--model-dir", default=None, help="passkey model directory (default: the bundled one)")
    needle.add_argument("--gates-dir", default=None,
                        help="folder holding its full_attention_heads.tsv (default: the bundled gates)")
    needle.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="context lengths in tokens (default: %(default)s)")
    needle.add_argument("--samples-per-cell", type=int, default=4,
                        help="samples per (context length, depth) cell (default: %(default)s)")
    _sizes(needle, 64, 256)
    needle.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    needle.add_argument("-o", "--output", default="needle_results",
                        help="writes OUTPUT.json and OUTPUT.png (default: %(default)s)")
    needle.set_defaults(func=_cmd_needle)

    from duo_compile.tools.bench import add_arguments

    bench = sub.add_parser("bench", help="decode/prefill/memory/max context, DuoAttention vs full attention (GPU; "
                                         "--models tiny checks it on a CPU)")
    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (default: the "
                                         "bundled passkey model)")
    serve.add_argument("model", nargs="?", default=None,
                       help="a local model directory (with --masks) or an engine file (default: the bundled model)")
    serve.add_argument("--masks", default=None, help="full_attention_heads.tsv for a MODEL_DIR (default: none)")
    serve.add_argument("--sparsity", type=float, default=None,
                       help="binarise the gates: this fraction of heads made streaming (default: 0.5 for the "
                            "bundled model; a MODEL_DIR's gates must be binary or take --sparsity/--threshold)")
    serve.add_argument("--threshold", type=float, default=None,
                       help="binarise the gates: gates above this are retrieval heads (default: none)")
    _sizes(serve, 64, 256)
    serve.add_argument("--max-seq-len", type=int, default=None,
                       help="positions per request, prompt + output (default: the model's max_position_embeddings)")
    serve.add_argument("--chunk", type=int, default=None,
                       help="longest prefill chunk of one request per step (default: the token budget)")
    serve.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                       help="how a model is compiled: inductor (compiled by Inductor) or eager (default: %(default)s)")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="weights and cache dtype of a MODEL_DIR (default: %(default)s)")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if there is one, else cpu)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--max-num-seqs", type=int, default=8,
                       help="most requests running at once: the slots, one streaming cache row each "
                            "(default: %(default)s)")
    serve.add_argument("--page-size", type=int, default=16,
                       help="positions per retrieval KV page of a compiled model; 0: no paging, one max_seq_len row "
                            "per slot (default: %(default)s; an engine file is served unpaged)")
    serve.add_argument("--kv-cache-memory", type=float, default=None,
                       help="KV cache budget in GiB: the slots' streaming rows, the rest retrieval pages "
                            "(default: none)")
    serve.add_argument("--kv-cache-fraction", type=float, default=None,
                       help="KV cache budget as a fraction of the device's free memory (default: none)")
    serve.add_argument("--token-budget", type=int, default=None,
                       help="tokens per step, decode plus prefill chunks, >= --max-num-seqs (default: the chunk, "
                            "else 2048)")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="requests queued for a slot; more get 429 (default: %(default)s)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id of the API (default: the model's folder or file name, or duo-passkey)")
    serve.set_defaults(func=_cmd_serve)
    for p in sub.choices.values():
        _state_defaults(p)
    return parser


# ----------------------------------------------------------------------------------------------------- main
def _raised_by_duo_compile(err: BaseException) -> bool:
    """True when a ``raise`` statement of duo_compile's own code raised ``err`` (a deliberate message such as
    'needs a CUDA GPU'), not torch or another library, nor an op that duo_compile called."""
    import dis

    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if not str(tb.tb_frame.f_globals.get("__name__", "")).startswith("duo_compile."):
        return False
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS"
               for i in dis.get_instructions(tb.tb_frame.f_code))


def _is_user_error(err: Exception) -> bool:
    """Bad arguments and files (ValueError, duo_compile's EngineFileError), the file system (OSError:
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ENOSPC...), and the RuntimeErrors
    duo_compile raises on purpose (BackendUnavailableError, a missing GPU). Anything else is a bug."""
    if isinstance(err, (ValueError, OSError)) or type(err).__module__.startswith("duo_compile."):
        return True  # (duo_compile's own exception classes, e.g. BackendUnavailableError, are deliberate)
    return isinstance(err, RuntimeError) and _raised_by_duo_compile(err)


def _one_line(err: Exception) -> str:
    """The error's message on one line: OSError without its '[Errno N]' prefix; a multi-line message (torch's,
    transformers') cut to its first line (``DUO_COMPILE_TRACEBACK=1`` shows all of it)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        for sep, name in ((": ", err.filename), (" -> ", err.filename2)):
            if name is not None:
                text += f"{sep}{os.fsdecode(name) if isinstance(name, bytes) else name!r}"
    else:
        text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _close_progress_bars() -> None:
    """Close tqdm bars left open by the interrupted or failed work (identify's, transformers'), so the message
    goes on a line of its own rather than after a half-drawn bar, and no bar is redrawn after it at exit."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot draw any more: nothing to tidy
            pass


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return args.func(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"duo-compile{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not _is_user_error(err) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        _close_progress_bars()
        print(f"duo-compile{' ' + command if command else ''}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
