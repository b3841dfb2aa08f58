"""The answer line: how a rationale ends. Gold rationales and prompts write it; every stage reads it here."""

from __future__ import annotations

import re

# The answer line, the one definition every stage shares. Prompts and gold rationales *write* ANSWER_PREFIX;
# a model's output is *read* by ANSWER_RE, which also takes a sentence like "... so the answer is B." (hub
# models often end so). Scoring (the gate's force-kept answer), distillation and the metrics all cut there.
ANSWER_PREFIX = "Answer:"
ANSWER_RE = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)


def answer_line_start(text: str) -> int | None:
    """Character index where the final answer statement starts (the last `Answer:` / `answer is`), or None."""
    starts = [m.start() for m in ANSWER_RE.finditer(text)]
    return starts[-1] if starts else None
