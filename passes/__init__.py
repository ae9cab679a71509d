"""Graph passes that turn a captured transformer into a DuoAttention graph (see ``pipeline.py`` for the order)."""
from .context import SKIPPED, AttentionSite, CacheSpec, PassContext
from .pipeline import PIPELINE, run_pass, run_passes

__all__ = ["AttentionSite", "CacheSpec", "PassContext", "PIPELINE", "SKIPPED", "run_pass", "run_passes"]
