"""Seeded, verifiable reasoning problems with exact integer answers, at three difficulty levels.

Level 1: one operation on small numbers. Level 2: two-digit addition or subtraction.
Level 3: short multi-step word problems. The mix is chosen so a 135M model is neither at floor
nor at ceiling; bigger models should use `level=3` only or a GSM8K-style JSONL.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INSTRUCTION = "Answer with the final number."

# Generation budget for these problems. The old 64 new tokens cut about 40% of SmolLM2-135M's
# answers mid-reasoning (a method that shortened answers then gained "accuracy"); at 256 the answers
# still cut are repetition loops that no budget ends (docs/results/capability-smollm2-135m.md).
MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: int
    level: int

    @property
    def prompt(self) -> str:
        return f"{self.question} {INSTRUCTION}"


def _level1(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    op = rng.choice("+-*")
    if op == "-":
        a, b = max(a, b) + 1, min(a, b)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", value


def _level2(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 60), rng.randint(10, 40)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", a + b
    return f"What is {a + b} - {b}?", a


_NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas"]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells"]


def _level3(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(5, 30), rng.randint(2, 15), rng.randint(1, 5)
    kind = rng.randrange(3)
    if kind == 0:
        c = min(c, a + b)
        text = (
            f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
            f"How many {item} does {name} have now?"
        )
        return text, a + b - c
    if kind == 1:
        per = rng.randint(2, 6)
        text = (
            f"{name} buys {c + 1} boxes with {per} {item} in each box and already had {b}. "
            f"How many {item} does {name} have in total?"
        )
        return text, (c + 1) * per + b
    total = c * rng.randint(2, 8)
    text = f"{name} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"
    return text, total // c


_LEVELS = {1: _level1, 2: _level2, 3: _level3}


def generate_problems(n: int, *, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """`n` problems cycling through `levels`; the same seed gives the same problems."""
    rng = random.Random(f"reasoning:{seed}")
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        question, answer = _LEVELS[level](rng)
        out.append(Problem(f"reason-{seed}-{i:04d}", question, answer, level))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> float | None:
    """The first number after the last 'answer is' / 'answer:', else the last number in the text."""
    marked = re.split(r"answer is|answer:", text, flags=re.IGNORECASE)
    found = _NUMBER.findall(marked[-1]) if len(marked) > 1 else []
    candidates = found[:1] or _NUMBER.findall(text)[-1:]
    if not candidates:
        return None
    try:
        return float(candidates[0].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: int) -> bool:
    got = extract_answer(text)
    return got is not None and abs(got - answer) < 1e-9
