"""Capture: one ATen-level fx graph per model, attention still visible as SDPA (torch.export)."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

import torch
from torch import fx

from duo_compile import repeat_layers as _repeat_layers
from duo_compile.models.hf import CausalLMForCapture

_EXAMPLE_BATCH, _EXAMPLE_LEN = 2, 8


@contextlib.contextmanager
def _sdpa_eval_mode(model: torch.nn.Module):
    """Run the model in eval mode with SDPA attention for the duration of the capture, then restore both."""
    was_training = model.training
    config = getattr(model, "config", None)
    old_impl = getattr(config, "_attn_implementation", None)
    try:
        model.eval()
        if config is not None and old_impl != "sdpa":
            model.set_attn_implementation("sdpa")
        yield
    finally:
        if config is not None and getattr(config, "_attn_implementation", None) != old_impl and old_impl is not None:
            model.set_attn_implementation(old_impl)
        model.train(was_training)


@contextlib.contextmanager
def _tensor_attributes_kept(model: torch.nn.Module):
    """Undo tensor attributes that the model's forward assigns while it is traced: they would be export's fake
    tensors left on the user's model (longrope's rotary module caches ``long_inv_freq`` on its first call)."""
    before = [(m, {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}) for m in model.modules()]
    try:
        yield
    finally:
        for module, tensors in before:
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and tensors.get(name) is not value:
                    if name in tensors:
                        setattr(module, name, tensors[name])
                    else:
                        delattr(module, name)


def _plain_signature(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree calling convention and shape-guard call, so passes can add placeholders.

    After this the graph is ``forward(input_ids, position_ids) -> logits`` with positional arguments.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)  # dtype checks only; they would keep dead mask computations alive
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    output.args = (result,)
    graph._codegen = fx.graph.CodeGen()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm._forward_pre_hooks.clear()  # export's input-spec check, which knows only the original two inputs
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _export(module: torch.nn.Module, args: tuple, dims: dict) -> torch.export.ExportedProgram:
    """torch.export with the math SDPA backend: the fused CUDA kernels' meta functions add alignment guards on the
    sequence length (mask padded to a multiple of 8) that export cannot prove for every length; the SDPA nodes
    are replaced by the passes anyway. If some other guard still trips the strict ranges, fall back to
    ``Dim.DYNAMIC``, which records guards instead of refusing them (the passes never depend on them)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        try:
            return torch.export.export(module, args, dynamic_shapes=dims)
        except torch._dynamo.exc.UserError as strict_error:
            if "Constraints violated" not in str(strict_error):
                raise
            loose = {name: {axis: torch.export.Dim.DYNAMIC for axis in spec} for name, spec in dims.items()}
            return torch.export.export(module, args, dynamic_shapes=loose)


def capture(model: torch.nn.Module, *, last_logits_only: bool = True, repeat_layers: bool = True) -> fx.GraphModule:
    """Export ``model`` as ``forward(input_ids [B, T], position_ids [B, T]) -> logits`` with dynamic B and T.

    The model itself is left as it was (mode and attention implementation restored); the graph refers to its
    parameters without copying them. ``repeat_layers``: where the decoder layers are interchangeable, export only
    the first few and repeat the last one (``repeat_layers.py``: same graph, a fraction of the time); False
    always exports the whole model.
    """
    layers = _repeat_layers.plan(model) if repeat_layers else None
    if layers is not None:
        try:
            with layers.first_layers(model):
                short = _capture(model, last_logits_only)
        except CaptureError:
            short = None  # the whole model's export below says what fails
        graph = _repeat_layers.repeat(short, layers) if short is not None else None
        if graph is not None:
            return graph
    return _capture(model, last_logits_only)


def _capture(model: torch.nn.Module, last_logits_only: bool) -> fx.GraphModule:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_LEN), device=device)
    position_ids = torch.arange(_EXAMPLE_LEN, device=device).expand(_EXAMPLE_BATCH, -1)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=1, max=1 << 24)
    dims = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    try:
        with _held_diagnostics(), _sdpa_eval_mode(model), _tensor_attributes_kept(model), torch.no_grad():
            program = _export(CausalLMForCapture(model, last_logits_only), (input_ids, position_ids), dims)
            return _plain_signature(program.module())
    except Exception as err:
        raise CaptureError(
            f"cannot capture {type(model).__name__} as one graph with torch.export: {type(err).__name__}: "
            f"{_first_line(err)} (the model uses something duo_compile does not lower; the full error is this "
            f"exception's __cause__)"
        ) from err


class CaptureError(ValueError):
    """torch.export could not capture the model as one graph. The message names the model class and the first
    line of the cause; the original exception is chained (``__cause__``)."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


@contextlib.contextmanager
def _held_diagnostics():
    """Hold torch's log records (below ERROR), Python warnings and what is printed to sys.stderr during the
    capture: replayed if it succeeds, dropped if it fails. A failed export prints and logs the partial graph
    (100+ lines) before raising; the CaptureError names the cause in one line instead."""
    held: list[tuple[logging.Handler, logging.LogRecord]] = []
    handlers = {h for logger in _torch_loggers() for h in logger.handlers}

    class Hold(logging.Filter):
        def __init__(self, handler: logging.Handler):
            super().__init__()
            self.handler = handler

        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno >= logging.ERROR:
                return True
            held.append((self.handler, record))
            return False

    filters = {h: Hold(h) for h in handlers}
    for handler, f in filters.items():
        handler.addFilter(f)
    printed = io.StringIO()  # torch.export also prints the partial graph of a failed export to sys.stderr
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(printed):
            yield
    finally:
        for handler, f in filters.items():
            handler.removeFilter(f)
    sys.stderr.write(printed.getvalue())  # only reached on success
    for handler, record in held:
        handler.handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _torch_loggers() -> list[logging.Logger]:
    loggers = [logging.getLogger("torch")]
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.") and isinstance(logger, logging.Logger):
            loggers.append(logger)
    return loggers
