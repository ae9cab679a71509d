"""Errors users meet first: the command line's one-line errors, unsupported model features, masks files.

- The CLI: every user error (bad argument, bad file, full disk, Ctrl-C) is exactly one line on stderr, exit status
  2 (130 for Ctrl-C), no traceback, naming the bad value; every argument is checked before the model (or engine)
  is loaded; a genuine bug keeps its traceback. ``--version``; every option's help states its default.
- Models: dynamic RoPE scaling is refused before capture with a one-line ValueError; any capture failure is one
  ``CaptureError`` naming the model class and the first line of the cause (chained); the supported RoPE variants
  compile and equal the oracle.
- Masks files: a UTF-8 byte-order mark is skipped; write errors name the user's path, not the temporary file.
"""
from __future__ import annotations

import errno
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from transformers import LlamaConfig, LlamaForCausalLM

import duo_compile
from duo_compile.capture import CaptureError, capture
from duo_compile.export.api import BackendUnavailableError
from duo_compile.export.engine_file import EngineFileError
from duo_compile.models.hf import longrope_branches_on_length
from duo_compile.oracle import oracle_generate
from tests.tiny_models import mixed_gates, tiny_config, tiny_model


CLI = importlib.import_module("duo_compile.cli")
COMPILER = sys.modules["duo_compile.compiler"]
REPO = Path(__file__).resolve().parent.parent
SINK, RECENT, MAX_LEN = 4, 8, 64


def _llama(rope: dict, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """The tiny Llama of tiny_models with ``rope`` as its RoPE parameters (q/k scaled up the same way)."""
    fields = {k: v for k, v in tiny_config("llama").to_dict().items() if k not in ("rope_parameters", "rope_scaling")}
    config = LlamaConfig(**{**fields, "max_position_embeddings": max_positions,
                            "rope_parameters": {**rope, "rope_theta": 10000.0}})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A model directory, masks, a dynamic-RoPE model's config.json, and an identify-sized model."""
    folder = tmp_path_factory.mktemp("cli_errors")
    tiny_model("llama", gqa=True).save_pretrained(folder / "model")
    _llama(DYNAMIC).save_pretrained(folder / "dynamic")  # refused from its config.json, before the weights load
    duo_compile.HeadMasks.from_gates(mixed_gates(3, 2)).to_tsv(folder / "good.tsv")
    return folder


def _one_error_line(err: str, command: str, message: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"duo-compile {command}: error: "), err
    assert re.search(message, lines[0]), err
    return lines[0]


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Loading a model, an engine, the passkey model, or running the demo is a test failure."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the CLI did work before refusing its arguments")

    monkeypatch.setattr(CLI, "_load_model", tripwire)
    monkeypatch.setattr(duo_compile, "load", tripwire)
    monkeypatch.setattr(COMPILER, "capture", tripwire)
    monkeypatch.setattr(importlib.import_module("duo_compile.identify.passkey"), "load_passkey_model", tripwire)
    monkeypatch.setattr(importlib.import_module("duo_compile.tools.demo"), "run_demo", tripwire)


COMPILE = ["compile", "{d}/model", "--masks", "{d}/good.tsv", "-o", "{d}/out.pt2"]
# argv (with {d} for the folder), stderr regex
CASES = {
    # compile: everything is checked before the model is loaded
    "masks-is-a-directory": (["compile", "{d}/model", "--masks", "{d}", "-o", "{d}/out.pt2"],
                             r"--masks '.*cli_errors\d*' is a directory; give the masks file in it"),
    "backend-tensorrt": (COMPILE + ["--backend", "tensorrt"],
                         r"--backend tensorrt is not available here .*use --backend onnx"),
    "max-seq-len-one": (COMPILE + ["--max-seq-len", "1"], r"--max-seq-len must be an integer >= 2 .*, got 1"),
    "dynamic-rope": (["compile", "{d}/dynamic", "--masks", "{d}/good.tsv", "-o", "{d}/out.pt2"],
                     r"unsupported: dynamic RoPE scaling \(rope_type 'dynamic', rope_parameters=.*'factor': 2\.0.* "
                     r"in LlamaForCausalLM"),
    # run: the ids before the engine is loaded
    "run-ids-empty": (["run", "{d}/missing.pt2", "--ids", ""], r"--ids is empty: .*got ''"),
    "run-ids-separators-only": (["run", "{d}/missing.pt2", "--ids", ", ,"], r"--ids is empty: .*got ', ,'"),
    "run-ids-negative": (["run", "{d}/missing.pt2", "--ids=-1,2"], r"--ids must be token ids >= 0, got '-1,2'"),
    "run-max-new-tokens-negative": (["run", "{d}/missing.pt2", "--ids", "1", "--max-new-tokens", "-1"],
                                    r"--max-new-tokens must be an integer >= 0, got -1"),
    # identify
    "identify-output-is-a-file": (["identify", "{d}/model", "-o", "{d}/good.tsv"],
                                  r"-o/--output '.*good\.tsv' is a file, not a folder"),
    "identify-output-under-a-file": (
        ["identify", "{d}/model", "-o", "{d}/good.tsv/gates"],
        r"cannot create the folder -o/--output '.*good\.tsv/gates': '.*good\.tsv' is a file"),
    "identify-steps-zero": (["identify", "{d}/model", "-o", "{d}/g", "--steps", "0"],
                            r"--steps must be an integer >= 1, got 0"),
    "identify-lr-zero": (["identify", "{d}/model", "-o", "{d}/g", "--lr", "0"], r"--lr must be a number > 0, got 0"),
    "identify-reg-weight-nan": (["identify", "{d}/model", "-o", "{d}/g", "--reg-weight", "nan"],
                                r"--reg-weight must be a number >= 0, got nan"),
    "identify-device-unknown": (["identify", "{d}/model", "-o", "{d}/g", "--device", "gpu"],
                                r"--device must be a torch device such as cpu, cuda or cuda:1, got 'gpu'"),
    "identify-model-missing": (["identify", "{d}/nomodel", "-o", "{d}/g"],
                               r"model directory '.*nomodel' does not exist"),
    "identify-tokenizer-missing": (["identify", "{d}/model", "-o", "{d}/g", "--tokenizer", "{d}/notok"],
                                   r"--tokenizer '.*notok' does not exist"),
    # needle
    "needle-samples-per-cell-zero": (["needle", "--samples-per-cell", "0", "-o", "{d}/n"],
                                     r"--samples-per-cell must be an integer >= 1, got 0"),
    "needle-context-zero": (["needle", "--contexts", "1024", "0", "-o", "{d}/n"],
                            r"--contexts must be an integer >= 1, got 0"),
    "needle-output-dir-missing": (["needle", "-o", "{d}/nowhere/n"],
                                  r"-o/--output '.*nowhere/n': directory .* does not exist"),
    "needle-model-dir-missing": (["needle", "--model-dir", "{d}/nomodel", "-o", "{d}/n"],
                                 r"--model-dir '.*nomodel' does not exist"),
    # demo
    "demo-sparsity": (["demo", "--sparsity", "1.5"], r"--sparsity must be a number in \[0, 1\], got 1\.5"),
    "demo-recent-zero": (["demo", "--recent", "0"], r"--recent must be an integer >= 1, got 0"),
}
if not torch.cuda.is_available():
    CASES["identify-device-cuda-without-gpu"] = (["identify", "{d}/model", "-o", "{d}/g", "--device", "cuda"],
                                                 r"--device 'cuda': this machine has 0 CUDA GPU\(s\)")


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_is_one_line_naming_the_value_before_any_work(cli_dir, nothing_loaded, capsys, case):
    argv, message = CASES[case]
    assert CLI.main([a.format(d=cli_dir) for a in argv]) == 2
    captured = capsys.readouterr()
    _one_error_line(captured.err, argv[0], message)
    assert not (cli_dir / "out.pt2").exists() and not (cli_dir / "g").exists() and not (cli_dir / "n.json").exists()


def test_compile_checks_accept_good_arguments_and_default_max_seq_len_to_the_models(cli_dir):
    """The pre-load checks pass a good command through: masks as given, max_seq_len from config.json."""
    args = CLI.build_parser().parse_args([a.format(d=cli_dir) for a in COMPILE])
    masks, max_seq_len = CLI._check_compile(args)
    assert max_seq_len == 512 and masks == duo_compile.HeadMasks.from_gates(mixed_gates(3, 2))
    args = CLI.build_parser().parse_args([a.format(d=cli_dir) for a in COMPILE] + ["--max-seq-len", "2"])
    assert CLI._check_compile(args)[1] == 2


# Errors raised deep inside a command (after its checks): each kind is one line naming the path or value.
DEEP_ERRORS = {
    "value-error-multi-line": (ValueError("first line names 'x'\n  torch's details\n  more"), r"first line names 'x'$"),
    "file-not-found": (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/m.tsv"),
                       r"error: No such file or directory: '/data/m\.tsv'$"),
    "is-a-directory": (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), r"Is a directory: '/data'$"),
    "not-a-directory": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), r"Not a directory: '/f/x'$"),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/root/e.pt2"),
                   r"Permission denied: '/root/e\.pt2'$"),
    "disk-full": (OSError(errno.ENOSPC, "cannot write the engine file 'e.pt2': No space left on device"),
                  r"error: cannot write the engine file 'e\.pt2': No space left on device$"),
    "disk-full-raw": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), r"error: No space left on device$"),
    "engine-file": (EngineFileError("e.pt2: truncated or damaged (digest differs)"), r"e\.pt2: truncated or damaged"),
    "backend-unavailable": (BackendUnavailableError("backend 'tensorrt' is not available"), r"not available$"),
}


@pytest.mark.parametrize("case", list(DEEP_ERRORS))
def test_cli_user_errors_raised_inside_a_command_are_one_line(monkeypatch, capsys, case):
    error, message = DEEP_ERRORS[case]

    def command(args):
        raise error

    monkeypatch.setattr(CLI, "_cmd_run", command)
    assert CLI.main(["run", "e.pt2", "--ids", "1"]) == 2
    _one_error_line(capsys.readouterr().err, "run", message)


def _torch_shape_error():
    return torch.zeros(2) + torch.zeros(3)  # RuntimeError from torch itself


@pytest.mark.parametrize("bug, kind", [
    (lambda: {}["missing"], KeyError),
    (lambda: None.generate(), AttributeError),
    (_torch_shape_error, RuntimeError),
])
def test_cli_shows_the_traceback_of_a_genuine_bug(monkeypatch, capsys, bug, kind):
    """Only user errors are shortened: a bug (here KeyError, AttributeError, a RuntimeError from a torch op)
    propagates with its traceback (python -m prints it, exit status 1)."""
    monkeypatch.setattr(CLI, "_cmd_run", lambda args: bug())
    with pytest.raises(kind):
        CLI.main(["run", "e.pt2", "--ids", "1"])
    assert "error:" not in capsys.readouterr().err


def test_cli_traceback_variable_shows_user_errors_in_full(monkeypatch):
    monkeypatch.setenv(CLI.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="--ids is empty"):
        CLI.main(["run", "e.pt2", "--ids", ""])


def test_cli_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(CLI, "_cmd_identify", interrupted)
    assert CLI.main(["identify", "m", "-o", "g"]) == 130
    assert capsys.readouterr().err == "duo-compile identify: interrupted\n"


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def test_cli_module_has_a_main_guard_version_and_one_line_errors(tmp_path):
    """``python -m duo_compile.cli``: --version, and a refused command is one line on stderr, exit status 2. The two
    processes run at the same time (their start-ups overlap)."""
    commands = {"version": ["--version"], "refused": ["run", "e.pt2", "--ids", ""]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "duo_compile.cli", *args], cwd=tmp_path, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    try:
        (version_out, _), (refused_out, refused_err) = (proc.communicate(timeout=300) for proc in procs.values())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert procs["version"].returncode == 0 and version_out.strip() == f"duo-compile {duo_compile.__version__}"
    assert procs["refused"].returncode == 2, refused_err
    _one_error_line(refused_err, "run", r"--ids is empty")
    assert refused_out == ""


def test_cli_ctrl_c_during_identify_prints_one_line_and_exits_130(tmp_path):
    """A real SIGINT while ``identify`` trains: 'interrupted' as the last line, exit status 130, no traceback."""
    model = tiny_model("llama", gqa=True)
    model.config.max_position_embeddings = 4096  # room for the passkey samples of identify's defaults
    model.save_pretrained(tmp_path / "model")
    # The child starts with SIGINT at its default: a process started in the background by a non-interactive shell
    # (as a test runner may be) ignores SIGINT, its children inherit that, and Python then keeps ignoring it.
    # PYTHONFAULTHANDLER: if the child does not exit, SIGABRT makes it print where each of its threads is.
    proc = subprocess.Popen([sys.executable, "-m", "duo_compile.cli", "identify", str(tmp_path / "model"), "-o",
                             str(tmp_path / "gates"), "--steps", "100000"], cwd=tmp_path,
                            env={**_env(), "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # an unread stdout pipe could fill
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while b"identify" not in b"".join(chunks) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the progress bar appears once training started
        assert proc.poll() is None, b"".join(chunks).decode(errors="replace")
        assert b"identify" in b"".join(chunks), "identify did not start training in time"
        proc.send_signal(signal.SIGINT)
        try:
            returncode = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            reader.join(timeout=10)
            pytest.fail("identify did not exit within 120 s of SIGINT; its stderr (tracebacks at SIGABRT):\n"
                        + b"".join(chunks).decode(errors="replace")[-6000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    err = b"".join(chunks).decode(errors="replace")
    assert returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert re.split(r"[\r\n]+", err.strip())[-1] == "duo-compile identify: interrupted"


def _expanded_help(parser, action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_every_cli_option_has_help_stating_its_default():
    parser = CLI.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"demo", "compile", "run", "identify", "needle", "bench", "serve"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = _expanded_help(sub, action)
            flag = f"{name} {action.option_strings[-1]}"
            assert len(text.replace("(default: ", "")) > 12, f"{flag} has no help"
            if action.required or action.default is False:
                continue
            assert "default" in text, f"{flag}: help does not state its default: {text!r}"  # value or words
    helps = {a.dest: _expanded_help(subparsers["compile"], a) for a in subparsers["compile"]._actions}
    assert helps["sink"].endswith("(default: 64)") and helps["backend"].endswith("(default: aoti)")
    assert "(default: the model's max_position_embeddings)" in helps["max_seq_len"]


def test_cli_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        CLI.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"duo-compile {duo_compile.__version__}"


# --------------------------------------------------------------------------------------------- RoPE, capture
@pytest.fixture
def no_capture(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("compile captured the model before refusing it")

    monkeypatch.setattr(COMPILER, "capture", tripwire)


@pytest.mark.parametrize("rope, named", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_parameters=\{.*'dynamic'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, r"'factor': 4\.0"),  # an old config.json's spelling
])
def test_dynamic_rope_is_refused_before_capture(no_capture, rope, named):
    fields = {k: v for k, v in tiny_config("llama").to_dict().items() if k not in ("rope_parameters", "rope_scaling")}
    model = LlamaForCausalLM(LlamaConfig(**fields, **rope)).eval()
    with pytest.raises(ValueError, match=r"^unsupported: dynamic RoPE scaling \(rope_type 'dynamic', ") as info:
        duo_compile.compile(model, mixed_gates(3, 2), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                            backend="eager")
    assert re.search(named, str(info.value)) and "LlamaForCausalLM" in str(info.value)
    assert "\n" not in str(info.value)


def test_dynamic_rope_module_is_refused_even_if_the_config_says_otherwise(no_capture):
    model = _llama({"rope_type": "default"})
    model.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match=r"dynamic RoPE scaling \(rope_type 'dynamic', LlamaRotaryEmbedding"):
        duo_compile.compile(model, mixed_gates(3, 2), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                            backend="eager")


def test_capture_failure_is_one_error_naming_the_model_and_the_cause(capfd):
    """The real failure (dynamic RoPE, captured without compile's check): one line, not torch's 100+ lines of
    partial graph; the original error is chained."""
    model = _llama(DYNAMIC)
    with pytest.raises(CaptureError) as info:
        capture(model)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(r"cannot capture LlamaForCausalLM as one graph with torch\.export: "
                    r"GuardOnDataDependentSymNode: Could not guard on data-dependent expression", message), message
    assert type(info.value.__cause__).__name__ == "GuardOnDataDependentSymNode"
    assert isinstance(info.value, ValueError)  # so the CLI reports it in one line
    assert "def forward" not in capfd.readouterr().err  # torch's log of the partial graph is held back
    assert not model.training and model.config._attn_implementation == "sdpa"


def test_any_capture_failure_names_the_model_class_and_first_line(monkeypatch):
    model = tiny_model("qwen2", gqa=False)
    model.config._attn_implementation = "eager"
    model.train()

    def export_fails(*args, **kwargs):
        raise RuntimeError("some torch internal\n  graph line 1\n  graph line 2")

    monkeypatch.setattr(torch.export, "export", export_fails)
    with pytest.raises(CaptureError, match=r"^cannot capture Qwen2ForCausalLM as one graph with torch\.export: "
                                           r"RuntimeError: some torch internal \(") as info:
        duo_compile.compile(model, mixed_gates(3, 4), sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                            backend="eager")
    assert "graph line" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError) and "graph line 1" in str(info.value.__cause__)
    assert model.training and model.config._attn_implementation == "eager"  # restored


HALF = 8  # head_dim 16 / 2
SUPPORTED_ROPE = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    # original length above every position used: the short factors (see notes on longrope's switch)
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 128,
                 "short_factor": [1.0 + i / HALF for i in range(HALF)], "long_factor": [2.0 + i for i in range(HALF)]},
}


@pytest.mark.parametrize("name", list(SUPPORTED_ROPE))
def test_supported_rope_variants_compile_and_match_the_oracle(name):
    model = _llama(SUPPORTED_ROPE[name])
    assert model.model.rotary_emb.rope_type == name
    masks = duo_compile.HeadMasks.from_gates(mixed_gates(3, 2))
    if name == "longrope" and longrope_branches_on_length():  # transformers < 5.21: refused up front instead
        with pytest.raises(ValueError, match=r"^unsupported: longrope RoPE scaling with transformers 5\.\d+"):
            duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN)
        return
    engine = duo_compile.compile(model, masks, sink_size=SINK, recent_size=RECENT, max_seq_len=MAX_LEN,
                                 backend="eager")
    # capture leaves no fake tensor on the model (longrope caches long_inv_freq while it is traced)
    assert not [(n, k) for n, m in model.named_modules() for k, v in vars(m).items() if isinstance(v, FakeTensor)]
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    out = engine.generate(ids, max_new_tokens=8, prefill_chunk_size=7, output_scores=True,
                          return_dict_in_generate=True)
    tokens, scores = oracle_generate(model, masks, ids, 8, sink_size=SINK, recent_size=RECENT)
    assert torch.equal(out.sequences, tokens)
    for got, want in zip(out.scores, scores):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


# ------------------------------------------------------------------------------------------------ masks files
def test_tsv_with_a_utf8_byte_order_mark_is_read(tmp_path):
    plain, marked = tmp_path / "plain.tsv", tmp_path / "marked.tsv"
    plain.write_text("1\t0\n0.25\t1\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert duo_compile.HeadMasks.from_tsv(marked) == duo_compile.HeadMasks.from_tsv(plain)


def test_to_tsv_into_a_missing_folder_names_the_users_path(tmp_path):
    target = tmp_path / "nowhere" / "gates.tsv"
    with pytest.raises(FileNotFoundError) as info:
        duo_compile.HeadMasks.all_retrieval(2, 2).to_tsv(target)
    assert f"cannot write the masks file {str(target)!r}: directory" in str(info.value)
    assert ".gates.tsv." not in str(info.value)  # not the temporary file's name


def test_to_tsv_onto_a_directory_names_it(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"cannot write the masks file .*: it is a directory"):
        duo_compile.HeadMasks.all_retrieval(2, 2).to_tsv(tmp_path)
    assert os.listdir(tmp_path) == []


def test_to_tsv_on_a_full_disk_names_the_users_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "gates.tsv"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savetxt", disk_full)
    with pytest.raises(OSError) as info:
        duo_compile.HeadMasks.all_retrieval(2, 2).to_tsv(path)
    assert info.value.errno == errno.ENOSPC
    assert info.value.strerror == f"cannot write the masks file {str(path)!r}: No space left on device"
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- needle_study
@pytest.mark.parametrize("kwargs, message", [
    (dict(samples_per_cell=0), r"samples_per_cell must be an integer >= 1, got 0"),
    (dict(context_lengths=[]), r"context_lengths is empty"),
    (dict(context_lengths=[1024, 0]), r"context_lengths\[1\] must be an integer >= 1, got 0"),
    (dict(depths=[0.5, 1.5]), r"depths\[1\] must be a number in \[0, 1\], got 1\.5"),
    (dict(sparsities=[float("nan")]), r"sparsities\[0\] must be a number in \[0, 1\], got nan"),
    (dict(recent_size=0), r"recent_size must be an integer >= 1, got 0"),
    (dict(gates=np.ones((3, 2))), r"gates must be HeadMasks, got ndarray"),
])
def test_needle_study_checks_its_arguments_first(kwargs, message):
    from duo_compile.identify.needle import needle_study

    kwargs = {"gates": duo_compile.HeadMasks.all_retrieval(3, 2), **kwargs}
    with pytest.raises(ValueError, match=message):
        needle_study(None, **kwargs)  # model None: any work before the checks would fail otherwise
