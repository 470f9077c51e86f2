"""Text similarity: ROUGE-L F1 over lowercased words (DGR's similarity of a data set to the
model's own answers)."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 (longest common subsequence) over lowercased word tokens."""
    x, y = words(a), words(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for tx in x:
        cur = [0]
        for j, ty in enumerate(y, 1):
            cur.append(prev[j - 1] + 1 if tx == ty else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)
