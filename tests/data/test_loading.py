import json

import pytest

from loratune.config import DataConfig
from loratune.data.loading import DataError, load_split, read_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ROWS = [
    {"id": "a", "dialogue": "Ann: hi\r\nBob: hello  ", "summary": "  Ann greets Bob.\n"},
    {"id": "b", "dialogue": "", "summary": "Nothing was said."},
    {"id": "c", "dialogue": "Cat: bye", "summary": "   "},
    {"id": "d", "dialogue": "Dan: see you", "summary": "Dan leaves."},
]


def test_cleaning_normalises_and_counts_drops(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    examples, report = load_split(DataConfig(source=str(tmp_path)), "train")
    assert [ex.id for ex in examples] == ["a", "d"]
    assert examples[0].text == "Ann: hi\nBob: hello"
    assert examples[0].references == ["Ann greets Bob."]
    assert report.dropped == {"empty input": 1, "empty summary": 1}
    assert report.rows_read == 4


def test_val_file_serves_validation_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "val.jsonl", ROWS[:1])
    examples, _ = load_split(DataConfig(source=str(tmp_path)), "validation")
    assert len(examples) == 1


def test_missing_split_lists_available(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"split 'test' not found; available splits: \['train'\]"):
        load_split(DataConfig(source=str(tmp_path)), "test")


def test_missing_column_lists_available(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "summary": "y"}])
    with pytest.raises(DataError, match=r"column\(s\) \['dialogue'\] not found; available columns: \['summary', 'text'\]"):
        load_split(DataConfig(source=str(tmp_path)), "train")


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"doc": "Some text.", "abstract": "Short.", "key": 7}])
    config = DataConfig(source=str(path), text_column="doc", summary_column="abstract", id_column="key")
    examples, _ = load_split(config, "train")
    assert (examples[0].id, examples[0].text, examples[0].target) == ("7", "Some text.", "Short.")


def test_list_column_gives_several_references(tmp_path):
    rows = [{"id": "x", "dialogue": "A: hi", "summaries": ["One.", " Two. ", ""]}]
    path = write_jsonl(tmp_path / "multi.jsonl", rows)
    examples, _ = load_split(DataConfig(source=str(path), summary_column="summaries"), "test")
    assert examples[0].references == ["One.", "Two."]


def test_non_text_summary_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "dialogue": "A: hi", "summary": 5}])
    with pytest.raises(DataError, match=r"row 1: column 'summary' must be text or a list of texts, got int"):
        load_split(DataConfig(source=str(path)), "train")


def test_empty_after_cleaning_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [{"id": "x", "dialogue": " ", "summary": "s"}])
    with pytest.raises(DataError, match="no usable rows after cleaning"):
        load_split(DataConfig(source=str(path)), "train")


def test_limit_keeps_first_rows(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    examples, _ = load_split(DataConfig(source=str(tmp_path)), "train", limit=1)
    assert [ex.id for ex in examples] == ["a"]


def test_file_formats_give_same_rows(tmp_path):
    import pandas as pd

    rows = [{"id": "1", "dialogue": "A: hi", "summary": "A says hi."}, {"id": "2", "dialogue": "B: no", "summary": "B says no."}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "rows.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert read_rows(tmp_path / f"rows.{suffix}") == rows, suffix


def test_malformed_json_line_reports_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "dialogue": "a", "summary": "b"}\n{"id": 2, \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        read_rows(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "absent.jsonl")


def test_demo_source_loads_all_splits():
    for split, count in (("train", 60), ("validation", 12), ("test", 12)):
        examples, report = load_split(DataConfig(source="demo"), split)
        assert len(examples) == count, split
        assert not report.dropped


def test_real_samsum_quirks(real_samsum_dir):
    if real_samsum_dir is None:
        pytest.skip("LORATUNE_SAMSUM_DIR is not set")
    examples, report = load_split(DataConfig(source=str(real_samsum_dir)), "train")
    assert report.rows_read == 14732
    assert report.dropped["empty input"] == 1
    assert all("\r" not in ex.text for ex in examples)
    assert all(ex.target == ex.target.strip() for ex in examples)


def test_hub_dataset_is_loaded_through_datasets(monkeypatch):
    import datasets

    rows = [{"id": "h1", "dialogue": "Hub: hi", "summary": "Hub says hi."}]
    calls = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda source: ["train", "test"])

    def fake_load(source, split):
        calls.append((source, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples, report = load_split(DataConfig(source="someone/dialogues"), "test")
    assert calls == [("someone/dialogues", "test")]
    assert examples[0].id == "h1"
    assert report.source == "someone/dialogues (Hub)"
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: \['train', 'test'\]"):
        load_split(DataConfig(source="someone/dialogues"), "validation")


def test_unreachable_hub_dataset_explains_fix(monkeypatch):
    import datasets

    def offline(source):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    with pytest.raises(DataError, match="could not be loaded \\(ConnectionError\\).*--data DIR"):
        load_split(DataConfig(source="someone/dialogues"), "train")
