import pytest
from rouge_score import rouge_scorer

from loratune.evaluate.rouge import (
    ROUGE_KEYS,
    per_example_scores,
    rouge_scores,
    split_sentences,
)

# (prediction, reference, prediction sentences, reference sentences). The sentence lists
# are split by hand so that the expected ROUGE-Lsum does not depend on split_sentences.
PAIRS = [
    (
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        ["The cat sat on the mat."],
        ["A cat was sitting on the mat."],
    ),
    (
        "Police arrested two men. The men were charged with theft.",
        "Two men were arrested by police. They face theft charges.",
        ["Police arrested two men.", "The men were charged with theft."],
        ["Two men were arrested by police.", "They face theft charges."],
    ),
    (
        "Rain is expected tomorrow in the north.",
        "Forecasters expect heavy rain across northern regions tomorrow. Winds will rise.",
        ["Rain is expected tomorrow in the north."],
        ["Forecasters expect heavy rain across northern regions tomorrow.", "Winds will rise."],
    ),
    (
        "Shares fell 3.5 percent! Investors sold.",
        "Investors sold shares, which fell 3.5 percent.",
        ["Shares fell 3.5 percent!", "Investors sold."],
        ["Investors sold shares, which fell 3.5 percent."],
    ),
]


def _expected(prediction, reference, prediction_sentences, reference_sentences):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = scorer.score(reference, prediction)
    summary_scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    summary = summary_scorer.score("\n".join(reference_sentences), "\n".join(prediction_sentences))
    expected = {key: scores[key].fmeasure * 100 for key in ("rouge1", "rouge2", "rougeL")}
    expected["rougeLsum"] = summary["rougeLsum"].fmeasure * 100
    return expected


def test_per_example_matches_rouge_score():
    predictions = [pair[0] for pair in PAIRS]
    references = [pair[1] for pair in PAIRS]

    rows = per_example_scores(predictions, references)

    assert len(rows) == len(PAIRS)
    for row, pair in zip(rows, PAIRS):
        expected = _expected(*pair)
        for key in ROUGE_KEYS:
            assert row[key] == pytest.approx(expected[key]), (pair[0], key)


def test_mean_matches_rouge_score():
    predictions = [pair[0] for pair in PAIRS]
    references = [pair[1] for pair in PAIRS]
    expected_rows = [_expected(*pair) for pair in PAIRS]

    scores = rouge_scores(predictions, references)

    assert set(scores) == set(ROUGE_KEYS)
    for key in ROUGE_KEYS:
        expected_mean = sum(row[key] for row in expected_rows) / len(expected_rows)
        assert scores[key] == pytest.approx(expected_mean), key


def test_fixed_pairs_are_not_trivial():
    # Guards the comparison tests against pairs that would all score 0 or 100.
    rows = per_example_scores([pair[0] for pair in PAIRS], [pair[1] for pair in PAIRS])

    for row in rows:
        assert 0 < row["rouge1"] < 100


def test_identical_text_scores_100():
    text = "The council approved the budget. Spending on schools rises by 4.2 percent."

    scores = rouge_scores([text], [text])

    for key in ROUGE_KEYS:
        assert scores[key] == pytest.approx(100.0), key


def test_disjoint_text_scores_0():
    scores = rouge_scores(["apples and oranges"], ["quantum chromodynamics lecture"])

    for key in ROUGE_KEYS:
        assert scores[key] == 0.0, key


def test_stemmer_matches_word_forms():
    stemmed = rouge_scores(["the dogs were running"], ["the dog runs"])
    unstemmed = rouge_scores(["the dogs were running"], ["the dog runs"], use_stemmer=False)

    assert stemmed["rouge1"] > unstemmed["rouge1"]


def test_multi_reference_best_of():
    prediction = "The bridge reopened on Monday after repairs."
    references = [
        "Traffic returned to normal downtown.",
        "The bridge reopened on Monday after repairs.",
        "Repairs took three weeks.",
    ]

    scores = rouge_scores([prediction], [references])

    for key in ROUGE_KEYS:
        assert scores[key] == pytest.approx(100.0), key


def test_multi_reference_mixed_with_single():
    scores = per_example_scores(
        ["a red car", "a blue boat"],
        ["a red car", ["nothing alike here", "a blue boat"]],
    )

    for row in scores:
        for key in ROUGE_KEYS:
            assert row[key] == pytest.approx(100.0), key


def test_lsum_differs_from_l():
    # Sentence order is swapped, so one LCS over the whole text loses a sentence,
    # but the summary-level LCS matches each sentence on its own.
    prediction = "The storm hit the coast. Thousands lost power overnight."
    reference = "Thousands lost power overnight. The storm hit the coast."

    scores = rouge_scores([prediction], [reference])

    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 60.0


def test_split_sentences_tricky_text():
    text = (
        "Dr. Smith paid $3.5 million at 5 p.m. Friday for the U.S. Office, e.g. Rent. "
        "Was it worth it? Nobody knows! "
        'She said "Enough." Then she left.\n'
        "\n"
        "  Prices rose 2.75 percent vs. March. Mrs. Lee moved to Elm St. North. 2024 was calm.  \n"
        "the end. lowercase follows"
    )

    assert split_sentences(text) == [
        "Dr. Smith paid $3.5 million at 5 p.m. Friday for the U.S. Office, e.g. Rent.",
        "Was it worth it?",
        "Nobody knows!",
        'She said "Enough."',
        "Then she left.",
        "Prices rose 2.75 percent vs. March.",
        "Mrs. Lee moved to Elm St. North.",
        "2024 was calm.",
        "the end. lowercase follows",
    ]


def test_split_sentences_empty_text():
    assert split_sentences("") == []
    assert split_sentences(" \n\n  ") == []


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length: predictions has 2 items but references has 1"):
        rouge_scores(["one", "two"], ["one"])


def test_empty_reference_list_raises():
    with pytest.raises(ValueError, match="reference list for example 1 is empty"):
        rouge_scores(["one", "two"], ["one", []])


def test_empty_predictions_raises():
    with pytest.raises(ValueError, match="predictions is empty"):
        rouge_scores([], [])


def test_non_string_reference_raises():
    with pytest.raises(TypeError, match="references for example 0 must be strings"):
        rouge_scores(["one"], [[None]])


def test_empty_prediction_scores_0():
    rows = per_example_scores(["", "the same words"], ["some reference text", "the same words"])

    for key in ROUGE_KEYS:
        assert rows[0][key] == 0.0, key
        assert rows[1][key] == pytest.approx(100.0), key

    scores = rouge_scores(["", "the same words"], ["some reference text", "the same words"])
    assert scores["rouge1"] == pytest.approx(50.0)
