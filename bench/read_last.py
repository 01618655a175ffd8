"""Read lenses by hand: each lens's greedy explanation at the last token of a dozen fixed texts
(facts, dialogue, code, numbers), beside M's top-5 next tokens there, as a Markdown table.

usage: .venv/bin/python bench/read_last.py LENS [LENS ...]
(each LENS a saved lens directory of the same base model; the shipped lens is
`consistency_lens/shipped/smollm2-135m-sotu-pydoc-L20`). One model load for all lenses; nothing trained.
"""

import sys

import torch

from consistency_lens.evaluation.explain import explain_text
from consistency_lens.models.lens import ConsistencyLens

TEXTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Alice: Are you coming to the party tonight?\nBob: Sorry, I have to",
    "Q: What is 2 + 2?\nA:",
    "def add(a, b):\n    return",
    "import numpy as",
    "for i in range(",
    "1, 2, 3, 4, 5, 6,",
    "The president told Congress that the budget",
    "She opened the door and saw a",
    "Once upon a",
    "The United States declared its independence in",
]


def cell(text: str) -> str:
    """A Markdown table cell holding `text` as a quoted literal."""
    return "`" + repr(text).replace("|", "\\|").replace("`", "'") + "`"


def main(paths: list[str]) -> None:
    """Print one row per text: M's top-5 at its last token, then each lens's text and KL."""
    if not paths:
        sys.exit("usage: bench/read_last.py LENS [LENS ...]")
    torch.manual_seed(0)
    first = ConsistencyLens.from_pretrained(paths[0], device="cpu")
    lenses = [first] + [
        ConsistencyLens.from_pretrained(p, device="cpu", loaded=first.loaded) for p in paths[1:]
    ]
    for lens in lenses:
        lens.eval()
    print("| text (explained at its last token) | M's top-5 | " + " | ".join(paths) + " |")
    print("|---" * (2 + len(paths)) + "|")
    for text in TEXTS:
        cells = []
        top = None
        for lens in lenses:
            row = explain_text(lens, text, top_k=5)[-1]
            top = top or ", ".join(repr(t) for t, _ in row["top_model"])
            cells.append(f"{cell(row['explanation'])} ({row['kl']:.2f})")
        print(f"| {cell(text)} | {top} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
