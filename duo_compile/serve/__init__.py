"""Serving: continuous batching over the engine's cache rows (scheduler.py) behind an OpenAI-compatible HTTP
server (api.py, run by ``duo-compile serve``)."""
