"""Composition-of-Experts request routing: conversation -> category -> expert."""

CATEGORIES: tuple[str, ...] = ("math", "code", "knowledge", "writing", "summarize", "chat")
