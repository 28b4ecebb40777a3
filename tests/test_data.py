"""Tests for hf_lars.demo: the embedded corpus, its split, the BPE tokenizer, block grouping and the tiny model."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_lars import demo as hd

VOCAB = 1024  # small vocabulary keeps the tests fast; the recipes use 4096


@pytest.fixture(scope="session")
def splits() -> Any:
    return hd.corpus_datasets(validation_fraction=0.05, seed=0)


@pytest.fixture(scope="session")
def tokenizer(splits: Any) -> Any:
    return hd.train_tokenizer(splits["train"]["text"][:4000], vocab_size=VOCAB)


def _bpe_model(tokenizer: Any) -> Any:
    """The trained part of a tokenizer (vocab and merges); padding/truncation settings are call-time state."""
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]


# ------------------------------------------------------------------------------------------------ corpus
def test_shipped_corpus_size_and_integrity() -> None:
    text = hd.load_corpus()
    raw = text.encode("utf-8")
    assert 1_000_000 <= len(raw) <= 3_000_000
    assert 100_000 <= hd.CORPUS_PATH.stat().st_size <= 1_000_000  # gzip'ed
    assert hashlib.sha256(raw).hexdigest() == hd.corpus._CORPUS_SHA256  # the file README.md describes
    assert "Return" in text and "\n\n\n" not in text
    assert hd.load_corpus() is text  # read once
    paragraphs = hd.corpus_paragraphs()
    assert len(paragraphs) > 10_000
    assert all(p and p == p.strip() for p in paragraphs)


def _fake_stdlib(root: Path) -> None:
    files = {
        "b.py": '''"""Module b: the second module, which is long enough to keep."""\n''',
        "a.py": '''
            """Module a docstring, long enough to be kept in the corpus.

            Second paragraph of module a.


            Third paragraph after two blank lines.   """

            class Thing:
                """A class docstring of module a, also long enough."""

                def method(self):
                    """Short."""

                async def other(self):
                    """A coroutine method docstring, long enough to keep."""

            def func():
                """Module b: the second module, which is long enough to keep."""
            ''',
        "pkg/__init__.py": '''"""Package pkg: a package docstring that is long enough."""\n''',
        "test/test_a.py": '''"""Tests must never be part of the corpus, whatever their length."""\n''',
        "py2.py": '''"""Python 2 file."""\nprint "hello"\n''',
    }
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip("\n"))


def test_build_stdlib_corpus_on_a_fake_stdlib(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    _fake_stdlib(root)
    out1, out2 = tmp_path / "c1.txt.gz", tmp_path / "c2.txt.gz"
    text = hd.build_stdlib_corpus(out1, stdlib_dir=root)
    hd.build_stdlib_corpus(out2, stdlib_dir=root)
    assert out1.read_bytes() == out2.read_bytes()  # reproducible gzip: no name, no time stamp
    assert gzip.decompress(out1.read_bytes()).decode("utf-8") == text
    expected = [
        # a.py first (sorted paths), module -> class -> methods -> function, dedented, blank runs collapsed
        "Module a docstring, long enough to be kept in the corpus.\n\nSecond paragraph of module a.\n\n"
        "Third paragraph after two blank lines.",
        "A class docstring of module a, also long enough.",
        "A coroutine method docstring, long enough to keep.",
        "Module b: the second module, which is long enough to keep.",  # from a.func; b.py's copy is dropped
        "Package pkg: a package docstring that is long enough.",
    ]
    assert text == "\n\n".join(expected) + "\n"
    assert "Short." not in text and "Tests must never" not in text and "Python 2" not in text
    # the cap keeps whole docstrings only
    capped = hd.build_stdlib_corpus(None, max_bytes=len(expected[0]) + 10, stdlib_dir=root)
    assert capped == expected[0] + "\n"
    with pytest.raises(ValueError, match="max_bytes"):
        hd.build_stdlib_corpus(None, max_bytes=0, stdlib_dir=root)


@pytest.mark.skipif(
    sys.version.split()[0] != hd.corpus._CORPUS_PYTHON, reason="the shipped corpus was built on CPython " + hd.corpus._CORPUS_PYTHON
)
def test_rebuild_reproduces_shipped_corpus_prefix() -> None:
    rebuilt = hd.build_stdlib_corpus(None, max_bytes=120_000)
    assert len(rebuilt) > 100_000
    shipped = hd.load_corpus()
    assert shipped.startswith(rebuilt[:-1] + "\n\n")


# ------------------------------------------------------------------------------------------------ split
def test_corpus_datasets_split(splits: Any) -> None:
    paragraphs = hd.corpus_paragraphs()
    n_train, n_val = len(splits["train"]), len(splits["validation"])
    assert n_train + n_val == len(paragraphs)
    assert n_val == round(0.05 * len(paragraphs))
    assert splits["train"].column_names == ["text"]
    assert sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"])) == sorted(paragraphs)
    again = hd.corpus_datasets(validation_fraction=0.05, seed=0)
    assert list(again["validation"]["text"]) == list(splits["validation"]["text"])
    other = hd.corpus_datasets(validation_fraction=0.05, seed=1)
    assert list(other["validation"]["text"]) != list(splits["validation"]["text"])
    small = hd.corpus_datasets(validation_fraction=0.2, seed=0)
    assert len(small["validation"]) == round(0.2 * len(paragraphs))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_corpus_datasets_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="validation_fraction"):
        hd.corpus_datasets(validation_fraction=fraction)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trip_and_special_tokens(tokenizer: Any) -> None:
    sentence = "Return a new list containing all items from the iterable in ascending order — naïve ✓."
    ids = tokenizer(sentence)["input_ids"]
    assert tokenizer.decode(ids) == sentence
    assert len(ids) < len(sentence.encode("utf-8")) / 2  # it learned merges, not just bytes
    assert len(tokenizer) == VOCAB
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert not {0, 1, 2} & set(ids)  # nothing added on encode
    batch = tokenizer(["a b", "a much longer sentence"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0


def test_tokenizer_is_deterministic(splits: Any, tokenizer: Any) -> None:
    again = hd.train_tokenizer(splits["train"]["text"][:4000], vocab_size=VOCAB)
    assert _bpe_model(again) == _bpe_model(tokenizer)  # same vocabulary and merges, in the same order


def test_tokenizer_cache(tmp_path: Path, splits: Any, caplog: pytest.LogCaptureFixture) -> None:
    texts = splits["train"]["text"][:500]
    first = hd.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    with caplog.at_level(logging.INFO, logger="hf_lars.demo.corpus"):
        cached = hd.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    assert "loading cached tokenizer" in caplog.text
    assert _bpe_model(cached) == _bpe_model(first)
    assert cached.eos_token_id == 2 and cached.pad_token_id == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_lars.demo.corpus"):
        other = hd.train_tokenizer(texts, vocab_size=320, cache_dir=tmp_path)  # other settings: retrain
    assert "retraining" in caplog.text and len(other) == 320


def test_tokenizer_bad_inputs() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        hd.train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="at least one text"):
        hd.train_tokenizer([])


# ------------------------------------------------------------------------------------------------ grouping
def test_tokenize_and_group_blocks_and_labels(splits: Any, tokenizer: Any) -> None:
    import datasets

    block = 64
    texts = splits["train"]["text"][:300]  # < 1000 rows: one grouping batch, so the count is exact
    small = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    grouped = hd.tokenize_and_group(small, tokenizer, block_size=block)["train"]
    stream = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [2]]
    assert len(grouped) == len(stream) // block > 10
    assert set(grouped.column_names) == {"input_ids", "attention_mask", "labels"}
    rows = grouped[:]
    assert all(len(r) == block for r in rows["input_ids"])
    assert rows["labels"] == rows["input_ids"]
    assert all(m == [1] * block for m in rows["attention_mask"])
    assert [i for r in rows["input_ids"] for i in r] == stream[: len(grouped) * block]  # order kept, eos between


def test_tokenize_and_group_both_splits(splits: Any, tokenizer: Any) -> None:
    import datasets

    subset = datasets.DatasetDict(
        {"train": splits["train"].select(range(2000)), "validation": splits["validation"].select(range(100))}
    )
    grouped = hd.tokenize_and_group(subset, tokenizer, block_size=128)
    assert set(grouped) == {"train", "validation"}
    assert len(grouped["train"]) > 10 * len(grouped["validation"]) > 0
    assert len(grouped["validation"][0]["input_ids"]) == 128
    with pytest.raises(ValueError, match="block_size"):
        hd.tokenize_and_group(splits, tokenizer, block_size=1)


# ------------------------------------------------------------------------------------------------ model
def test_tiny_llama_config() -> None:
    cfg = hd.tiny_llama_config(VOCAB)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (VOCAB, 128, 4, 4)
    assert cfg.intermediate_size == 352  # ceil(8/3 * 128 / 32) * 32
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert hd.tiny_llama_config(VOCAB, hidden_size=64, intermediate_size=100).intermediate_size == 100
    assert hd.tiny_llama_config(VOCAB, rms_norm_eps=1e-5).rms_norm_eps == 1e-5
    with pytest.raises(ValueError, match="num_heads"):
        hd.tiny_llama_config(VOCAB, hidden_size=130, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        hd.tiny_llama_config(0)


def test_model_forward_loss_near_log_vocab(splits: Any, tokenizer: Any) -> None:
    cfg = hd.tiny_llama_config(len(tokenizer), hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128)
    model = hd.build_model(cfg, seed=0)
    ids = tokenizer(splits["validation"]["text"][:4], add_special_tokens=False, truncation=True, max_length=64,
                    padding="max_length", return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(len(tokenizer))) < 0.3
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_build_model_is_deterministic_and_keeps_global_rng() -> None:
    cfg = hd.tiny_llama_config(VOCAB, hidden_size=32, num_layers=1, num_heads=2)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = hd.build_model(cfg, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b, c = hd.build_model(cfg, seed=7), hd.build_model(cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert type(a).__name__ == "LlamaForCausalLM"
