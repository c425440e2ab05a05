"""ROUGE scores for generated summaries, computed offline with rouge-score 0.1.2.

Each score is an F-measure times 100, averaged over examples. Tokens are stemmed with
the Porter stemmer by default. ROUGE-Lsum treats each sentence from `split_sentences`
as one line, so it needs no nltk punkt download. When an example has several
references, each metric keeps its best F-measure over them, as
`RougeScorer.score_multi` does.
"""

from __future__ import annotations

import functools
import re
import statistics
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Abbreviations whose final period does not end a sentence. Matching is case-insensitive.
_ABBREVIATIONS = frozenset(
    {
        "mr.",
        "mrs.",
        "ms.",
        "dr.",
        "prof.",
        "st.",
        "e.g.",
        "i.e.",
        "etc.",
        "vs.",
        "a.m.",
        "p.m.",
        "u.s.",
    }
)

# A run of terminators, any closing quotes or brackets, then the whitespace after them.
_BOUNDARY = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*\s+""")
_OPENING_QUOTES = "\"'\u201c\u2018"
_LEADING_PUNCTUATION = "\"'\u201c\u2018(["


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with fixed rules, so no tokenizer model is downloaded.

    Every line break ends a sentence. Within a line, a sentence ends after `.`, `!` or
    `?` (optionally followed by closing quotes or brackets) when whitespace and then an
    uppercase letter, a digit or an opening quote come next. A period after a listed
    abbreviation such as "Dr." or "e.g." does not end a sentence, and a decimal point
    such as in "3.5" never does because no whitespace follows it.
    Sentences are stripped, and empty ones are dropped.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(_split_line(line))
    return sentences


def _split_line(line: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(line):
        if match.end() >= len(line):
            break
        next_char = line[match.end()]
        if not (next_char.isupper() or next_char.isdigit() or next_char in _OPENING_QUOTES):
            continue
        punctuation_end = match.start() + len(match.group().rstrip())
        if _ends_with_abbreviation(line[start:punctuation_end]):
            continue
        pieces.append(line[start:punctuation_end])
        start = match.end()
    pieces.append(line[start:])
    return [piece.strip() for piece in pieces if piece.strip()]


def _ends_with_abbreviation(text: str) -> bool:
    words = text.split()
    if not words:
        return False
    last_word = words[-1].lstrip(_LEADING_PUNCTUATION).lower()
    # NOTE: an abbreviation that really ends a sentence ("... and so on, etc. Then")
    # is also kept joined to the next sentence.
    return last_word in _ABBREVIATIONS


@functools.lru_cache(maxsize=4)
def _scorer(rouge_types: tuple[str, ...], use_stemmer: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def _normalize_references(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> list[list[str]]:
    """Validate the inputs and return each example's references as a list of strings."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) == 0:
        raise ValueError("predictions is empty. Pass at least one prediction to score.")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: predictions has {len(predictions)} "
            f"items but references has {len(references)}. Pass one reference entry per prediction."
        )

    normalized: list[list[str]] = []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"prediction {index} must be a string, got {type(prediction).__name__}")
        reference_list = [reference] if isinstance(reference, str) else list(reference)
        if not reference_list:
            raise ValueError(
                f"reference list for example {index} is empty. Give at least one reference string."
            )
        for text in reference_list:
            if not isinstance(text, str):
                raise TypeError(
                    f"references for example {index} must be strings, got {type(text).__name__}"
                )
        normalized.append(reference_list)
    return normalized


def _join_sentences(text: str) -> str:
    return "\n".join(split_sentences(text))


def per_example_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    use_stemmer: bool = True,
) -> list[dict[str, float]]:
    """Score each prediction against its references.

    Each entry of `references` is one reference string or a list of them. Returns one
    dict per example with the keys "rouge1", "rouge2", "rougeL" and "rougeLsum", each
    the best F-measure over that example's references, times 100. An empty prediction
    scores 0.

    Raises:
        ValueError: predictions is empty, the two sequences differ in length, or an
            example has an empty reference list.
        TypeError: a prediction or reference is not a string.
    """
    reference_lists = _normalize_references(predictions, references)
    sentence_scorer = _scorer(("rouge1", "rouge2", "rougeL"), use_stemmer)
    summary_scorer = _scorer(("rougeLsum",), use_stemmer)

    results: list[dict[str, float]] = []
    for prediction, example_references in zip(predictions, reference_lists):
        scores = sentence_scorer.score_multi(example_references, prediction)
        # rouge_score splits ROUGE-Lsum text into sentences at "\n" only.
        scores.update(
            summary_scorer.score_multi(
                [_join_sentences(reference) for reference in example_references],
                _join_sentences(prediction),
            )
        )
        results.append({key: scores[key].fmeasure * 100 for key in ROUGE_KEYS})
    return results


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Compute ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum, averaged over examples.

    Returns the mean of `per_example_scores` for each key, on a 0-100 scale. Arguments
    and errors are those of `per_example_scores`.
    """
    rows = per_example_scores(predictions, references, use_stemmer=use_stemmer)
    return {key: statistics.fmean(row[key] for row in rows) for key in ROUGE_KEYS}
