"""Graph passes that turn a captured transformer into a DuoAttention graph (see ``pipeline.py`` for the order)."""
from .context import AttentionSite, CacheSpec, PassContext
from .pipeline import PIPELINE, run_passes

__all__ = ["AttentionSite", "CacheSpec", "PassContext", "PIPELINE", "run_passes"]
