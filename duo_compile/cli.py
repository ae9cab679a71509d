"""``duo-compile``: the command line over the same calls as the Python API.

    duo-compile demo                       compile a small model with and without DuoAttention, print the savings
    duo-compile compile MODEL_DIR --masks full_attention_heads.tsv --sparsity 0.5 -o engine.pt2
    duo-compile run engine.pt2 --prompt "Once upon a time" --max-new-tokens 64 [--chat] [--do-sample --seed 0]
    duo-compile run engine.pt2 --ids 1,2,3 --max-new-tokens 16
    duo-compile identify MODEL_DIR -o gates/          head identification (the paper's gate optimisation)
    duo-compile needle                                passkey accuracy study of the bundled model
    duo-compile bench --patterns DIR --out DIR        end-to-end benchmark at Llama-2/Llama-3 shapes (GPU)
"""
from __future__ import annotations

import argparse
import os
import sys


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink", type=int, default=64, help="sink tokens kept by streaming heads (default 64)")
    p.add_argument("--recent", type=int, default=256, help="recent tokens kept by streaming heads (default 256)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of heads made streaming")
    p.add_argument("--threshold", type=float, default=None, help="gates above this are retrieval heads")
    p.add_argument("--max-seq-len", type=int, default=None, help="retrieval cache length (default: the model's)")
    p.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default: whole prompt)")
    p.add_argument("--mode", choices=("window", "chunk"), default="window", help="streaming semantics")


def _cmd_demo(args) -> int:
    from duo_compile.tools.demo import run_demo

    run_demo(sparsity=args.sparsity if args.sparsity is not None else 0.5, sink_size=args.sink,
             recent_size=args.recent, backend=args.backend, new_tokens=args.max_new_tokens)
    return 0


def _load_model(path: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):  # else transformers tries the Hub and fails with an OSError about the network
        raise FileNotFoundError(f"model directory {path!r} does not exist (a local Hugging Face model directory)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def _masks(args):
    from duo_compile.masks import HeadMasks

    masks = HeadMasks.from_tsv(args.masks)
    if args.sparsity is None and args.threshold is None and not masks.is_binary:
        raise ValueError("the gates in --masks are not binary: give --sparsity or --threshold")
    if args.sparsity is not None or args.threshold is not None:
        masks = masks.binarize(sparsity=args.sparsity, threshold=args.threshold)
    return masks


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
    from duo_compile.export.engine_file import check_writable

    masks = _masks(args)  # checked before the (slow) model load
    check_writable(args.output)  # and the output path, rather than after the model load and compile
    model = _load_model(args.model, args.dtype)
    tokenizer = None if args.no_tokenizer else _load_tokenizer(args.tokenizer or args.model, args.tokenizer is not None)
    engine = duo_compile.compile(model, masks, sink_size=args.sink, recent_size=args.recent,
                                 max_seq_len=args.max_seq_len, prefill_chunk_size=args.chunk,
                                 streaming_mode=args.mode, backend="eager", tokenizer=tokenizer)
    print(engine)
    duo_compile.export(engine, args.output, backend=args.backend)
    print(f"wrote {args.output} ({args.backend}{', with its tokenizer' if tokenizer is not None else ''})")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise ValueError(f"--ids must be integers separated by commas or spaces, got {text!r}") from err


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
    import torch

    import duo_compile

    if args.chat and args.ids is not None:
        raise ValueError("--chat applies to a text prompt (--prompt or --file), not to --ids")
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


def _cmd_identify(args) -> int:
    from duo_compile.identify import identify

    model = _load_model(args.model)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    gates = identify(model, tokenizer, num_steps=args.steps, sink_size=args.sink, recent_size=args.recent,
                     reg_weight=args.reg_weight, lr=args.lr, seed=args.seed, output_dir=args.output,
                     resume=args.resume, device=args.device)
    print(f"wrote {args.output}/full_attention_heads.tsv: {gates!r}")
    return 0


def _cmd_needle(args) -> int:
    import json

    import torch

    from duo_compile.identify.needle import needle_study, plot_needle_study
    from duo_compile.identify.passkey import load_passkey_gates, load_passkey_model

    device = torch.device(args.device)
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


def _cmd_bench(args) -> int:
    from duo_compile.tools.bench import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duo-compile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compile a small model with and without DuoAttention and compare")
    _add_compile_options(demo)
    demo.add_argument("--backend", choices=("inductor", "eager"), default="inductor")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.set_defaults(func=_cmd_demo)

    comp = sub.add_parser("compile", help="compile a local Hugging Face model directory and export an engine")
    comp.add_argument("model", help="a local model directory (config.json + weights)")
    comp.add_argument("--masks", required=True, help="full_attention_heads.tsv (rows = layers, columns = KV heads)")
    comp.add_argument("-o", "--output", required=True, help="engine file to write")
    comp.add_argument("--backend", choices=("aoti", "onnx", "tensorrt"), default="aoti")
    comp.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                      help="weights and cache dtype (default: the model directory's)")
    comp.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory); saved "
                                                        "in the engine file with its chat template")
    comp.add_argument("--no-tokenizer", action="store_true", help="write the engine without a tokenizer")
    _add_compile_options(comp)
    comp.set_defaults(func=_cmd_compile)

    run = sub.add_parser("run", help="load an exported engine and generate: text in, text out (streamed), or ids")
    run.add_argument("engine", help="engine file written by `duo-compile compile`")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="prompt text (needs the engine's tokenizer)")
    prompt.add_argument("--file", default=None, help="read the prompt text from this file ('-': standard input)")
    prompt.add_argument("--ids", default=None, help="prompt token ids, e.g. 1,2,3 (prints prompt + new ids)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    run.add_argument("--max-new-tokens", type=int, default=16)
    sampling = run.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                          help="sample (default: the engine's generation config, else greedy)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy, whatever the config says")
    run.add_argument("--temperature", type=float, default=None)
    run.add_argument("--top-k", type=int, default=None)
    run.add_argument("--top-p", type=float, default=None)
    run.add_argument("--seed", type=int, default=None, help="seed the RNG (torch.manual_seed) before generating")
    run.set_defaults(func=_cmd_run)

    ident = sub.add_parser("identify", help="identify retrieval heads of a local model (writes the authors' TSV)")
    ident.add_argument("model", help="a local model directory")
    ident.add_argument("-o", "--output", required=True, help="folder for full_attention_heads.tsv + config.json")
    ident.add_argument("--tokenizer", default=None, help="tokenizer directory (default: generated filler tokens)")
    ident.add_argument("--steps", type=int, default=2000)
    ident.add_argument("--sink", type=int, default=128)
    ident.add_argument("--recent", type=int, default=256)
    ident.add_argument("--reg-weight", type=float, default=0.05)
    ident.add_argument("--lr", type=float, default=0.02)
    ident.add_argument("--seed", type=int, default=42)
    ident.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    ident.add_argument("--device", default=None)
    ident.set_defaults(func=_cmd_identify)

    needle = sub.add_parser("needle", help="passkey accuracy study of the bundled model (full vs duo vs baselines)")
    needle.add_argument("--model-dir", default=None, help="default: the bundled passkey model")
    needle.add_argument("--gates-dir", default=None, help="default: its identified gates")
    needle.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    needle.add_argument("--samples-per-cell", type=int, default=4)
    needle.add_argument("--sink", type=int, default=64)
    needle.add_argument("--recent", type=int, default=256)
    needle.add_argument("--device", default="cpu")
    needle.add_argument("-o", "--output", default="needle_results", help="writes OUTPUT.json and OUTPUT.png")
    needle.set_defaults(func=_cmd_needle)

    from duo_compile.tools.bench import add_arguments

    bench = sub.add_parser("bench", help="decode/prefill/memory/max context, DuoAttention vs full attention (GPU; "
                                         "--models tiny checks it on a CPU)")
    add_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"duo-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
