"""Tensor parallelism: head placement across ranks (``placement``) and the process group checks and collectives
the compiler and the runtime use (``group``)."""
