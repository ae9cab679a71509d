"""duo_compile: compile a transformer into a DuoAttention engine (retrieval + streaming heads)."""
