"""Calibration / evaluation text: sources, windows, seeded selection."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from lowbit.data.text import calibration_windows, eval_windows, read_texts, token_stream
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_txt_jsonl_parquet_give_the_same_documents(tmp_path):
    docs = ["first document", "second\nwith two lines"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text(docs[0])
    assert read_texts(tmp_path / "d.jsonl") == docs == read_texts(tmp_path / "d.parquet")
    assert read_texts(tmp_path / "d.txt") == [docs[0]]


def test_documents_are_joined_with_eos(tok):
    stream = token_stream(["a b", "c"], tok)
    assert (stream == tok.eos_token_id).sum() == 1


def test_same_seed_same_samples_and_windows_come_from_the_stream(text_file, tok):
    a = calibration_windows(text_file, tok, 8, 32, seed=0)
    b = calibration_windows(text_file, tok, 8, 32, seed=0)
    c = calibration_windows(text_file, tok, 8, 32, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = token_stream(read_texts(text_file), tok)
    all_windows = stream[: stream.numel() // 32 * 32].reshape(-1, 32)
    assert all(any(torch.equal(w, x) for x in all_windows) for w in a)


def test_eval_windows_are_the_first_consecutive_ones(text_file, tok):
    w = eval_windows(text_file, tok, 16, 3)
    stream = token_stream(read_texts(text_file), tok)
    assert torch.equal(w.flatten(), stream[:48])


def test_fewer_windows_than_asked_uses_all(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("def f(x):\n    return x\n" * 20)
    n = token_stream(read_texts(path), tok).numel() // 16
    assert len(calibration_windows(path, tok, 10_000, 16)) == n


def test_dataset_name_that_is_not_available_is_a_clear_error():
    with pytest.raises(LowbitError, match=r"not a file|local datasets cache"):
        read_texts("no-such-org-xyz/no-such-dataset")
