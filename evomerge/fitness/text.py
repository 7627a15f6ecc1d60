"""The held-out text the perplexity objective is measured on.

Merging can buy task skill by wrecking general language ability; perplexity on ordinary English
prose catches that. By default the text is the docstrings of a fixed list of Python standard
library modules: real English written by people, present on every machine without a download
(searches run offline), never part of the zoo's synthetic training data, and deterministic for
a Python version. A user's own text file replaces it for a domain that matters more to them.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from evomerge.errors import UserError

# Prose-heavy, stable modules; order fixes the text (and so the tokens a budget keeps).
STDLIB_MODULES = ("json", "csv", "textwrap", "functools", "itertools", "collections", "heapq",
                  "bisect", "random", "statistics", "argparse", "logging", "pathlib", "shutil",
                  "tempfile", "difflib", "string", "fractions", "decimal", "calendar")


def stdlib_docstrings() -> str:
    """Module, class and function docstrings of ``STDLIB_MODULES``, one paragraph each."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            value = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)) \
                    and getattr(value, "__module__", None) == name:
                docs.append(inspect.getdoc(value))
        parts.extend(d.strip() for d in docs if d and len(d.split()) >= 8)
    return "\n\n".join(parts)


def heldout_text(path: str = "") -> str:
    """The user's text file when ``path`` is given, else the standard library's docstrings."""
    if not path:
        return stdlib_docstrings()
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"fitness.perplexity_text {path!r} is not a file; give a UTF-8 text file or "
                        f"leave it empty for the standard-library docstrings")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"fitness.perplexity_text {path!r} is empty")
    return text


PERPLEXITY_WINDOW = 256
"""Tokens per window of the perplexity objective; the memory plan counts its logits by it."""


def token_windows(tokenizer, text: str, *, max_tokens: int, window: int = PERPLEXITY_WINDOW) -> list[list[int]]:
    """``max_tokens`` tokens of ``text`` as windows spread evenly over all of it, so the budget
    samples every module's prose rather than the first one's."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    chunks = [c for c in chunks if len(c) > 1]
    wanted = min(len(chunks), max(1, max_tokens // window))
    if wanted == 0:
        raise UserError("the perplexity text is too short to score (fewer than 2 tokens)")
    step = len(chunks) / wanted
    return [chunks[int(i * step)] for i in range(wanted)]
