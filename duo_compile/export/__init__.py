"""Engine files: ``export`` writes a compiled engine to a file and ``load`` reads it back (``api``).

``engine_file`` is the format every backend shares (metadata, integrity digest, atomic writes); ``aoti_export``
packages the graphs with AOTInductor, ``onnx_export`` lowers them to standard ONNX ops run by onnxruntime.
"""
from duo_compile.export.api import BackendUnavailableError, export, load

__all__ = ["BackendUnavailableError", "export", "load"]
