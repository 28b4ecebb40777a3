"""The offline text pipeline of ``hf-lars demo`` (also used by the recipes): corpus, split, tokenizer, blocks.

Everything here works without network access:

- an embedded English corpus (``hf_lars/demo/corpus.txt.gz``, shipped as package data): the docstrings of
  the CPython 3.11 standard library (PSF licence; provenance in ``hf_lars/demo/README.md``), rebuilt by
  :func:`build_stdlib_corpus`. Shipping the built file, rather than rebuilding it at run time, makes results
  identical on every Python version;
- :func:`corpus_datasets`: a deterministic train/validation split of its paragraphs as a ``DatasetDict``;
- :func:`train_tokenizer`: a deterministic byte-level BPE (``tokenizers``) wrapped as a
  ``PreTrainedTokenizerFast`` with ``<pad>``/``<s>``/``</s>``, optionally cached to a directory;
- :func:`tokenize_and_group`: the usual causal-LM preprocessing (``run_clm.py``): tokenize, append EOS to
  each paragraph, concatenate, cut into ``block_size`` blocks, ``labels = input_ids``;
- the model is :mod:`hf_lars.demo.model`.

Users with real data pass hub names or files to the recipes instead; this module only holds the offline
pieces. ``transformers``, ``datasets`` and ``tokenizers`` are imported inside the functions, so
``import hf_lars.demo.corpus`` stays cheap.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import io
import itertools
import json
import logging
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import transformers

__all__ = [
    "CORPUS_PATH",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
    "build_stdlib_corpus",
    "load_corpus",
    "corpus_paragraphs",
    "corpus_datasets",
    "train_tokenizer",
    "tokenize_and_group",
]

logger = logging.getLogger(__name__)

#: The shipped corpus (package data).
CORPUS_PATH: Path = Path(__file__).resolve().parent / "corpus.txt.gz"
# sha256 of the uncompressed shipped corpus (build_stdlib_corpus() on CPython 3.11.7); update on rebuild.
_CORPUS_SHA256 = "e9fc79f8dc32f026ce0fad4239d36b3f57091a7e99495207f3cefd53ac34f3f4"
_CORPUS_PYTHON = "3.11.7"

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
#: Special tokens in id order: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (Llama's bos/eos ids).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

# Directories of the stdlib that hold tests, demos, bundled third-party code or build data, not docs.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload",
     "turtledemo", "__phello__", "ensurepip"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_TOKENIZER_FORMAT = 1  # bump when train_tokenizer's recipe changes, to invalidate caches
_TOKENIZER_KEY_FILE = "hf_lars_tokenizer_key.json"


# ----------------------------------------------------------------------------------------------------------
# corpus
# ----------------------------------------------------------------------------------------------------------
def _stdlib_files(stdlib_dir: Path) -> list[Path]:
    """The stdlib's ``.py`` files, minus tests/demos/vendored code, in sorted relative-path order."""
    files = []
    for path in stdlib_dir.rglob("*.py"):
        rel = path.relative_to(stdlib_dir)
        if set(rel.parts[:-1]) & _EXCLUDED_DIRS:
            continue
        if rel.parts[0].startswith("config-") or rel.name.startswith("_sysconfigdata"):
            continue
        files.append(rel)
    return [stdlib_dir / rel for rel in sorted(files, key=lambda r: r.as_posix())]


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings of ``tree`` in source order (depth first), cleaned/dedented."""
    if isinstance(tree, _DOC_NODES):
        doc = ast.get_docstring(tree, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings(child)


def _file_docstrings(files: list[Path]) -> Iterator[str]:
    """Normalised docstrings of ``files`` in order; files that do not parse (Python 2 fixtures) are skipped."""
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError) as err:
            logger.debug("skipping %s: %s", path, err)
            continue
        for doc in _docstrings(tree):
            yield _normalise(doc)


def _normalise(doc: str) -> str:
    """Strip trailing spaces and collapse runs of blank lines, so paragraphs are separated by exactly one."""
    lines = [line.rstrip() for line in doc.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def build_stdlib_corpus(
    out_path: str | Path | None = None,
    max_bytes: int = 3_000_000,
    *,
    stdlib_dir: str | Path | None = None,
    min_chars: int = 40,
) -> str:
    """Build the corpus from the docstrings of the Python standard library (how ``corpus.txt.gz`` was made).

    Every ``.py`` file under ``stdlib_dir`` (default: this interpreter's stdlib), except tests, demos and
    vendored packages, is parsed with :mod:`ast` in sorted path order; module, class and function
    docstrings are taken in source order, dedented (:func:`inspect.cleandoc`), stripped of trailing spaces
    and of repeated blank lines. Docstrings shorter than ``min_chars`` and exact duplicates are dropped.
    Docstrings are joined by one blank line, up to ``max_bytes`` UTF-8 bytes (whole docstrings only).

    Args:
        out_path: where to write the text; a name ending in ``.gz`` is gzip'ed reproducibly (no file name
            or time stamp in the header). ``None`` only returns the text.
        max_bytes: size cap of the text in UTF-8 bytes.
        stdlib_dir: the stdlib directory to read (default ``sysconfig.get_paths()["stdlib"]``).
        min_chars: shortest docstring kept.

    Returns:
        The corpus text. The result depends on the Python version it is built with (the shipped file was
        built with CPython 3.11.7).
    """
    if max_bytes <= 0:
        raise ValueError(f"Invalid max_bytes: {max_bytes} (must be > 0)")
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib directory not found: {root}")
    files = _stdlib_files(root)
    seen: set[str] = set()
    docs: list[str] = []
    size = 0
    for doc in _file_docstrings(files):
        if len(doc) < min_chars or doc in seen:
            continue
        n = len(doc.encode("utf-8")) + (2 if docs else 0)  # + the blank line joining it to the previous one
        if size + n > max_bytes:
            break
        seen.add(doc)
        docs.append(doc)
        size += n
    text = "\n\n".join(docs) + "\n"
    logger.info("built a corpus of %d docstrings, %d bytes, from %d files under %s", len(docs), size, len(files), root)
    if out_path is not None:
        _write_text(Path(out_path), text)
    return text


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        buffer = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buffer, mtime=0) as gz:
            gz.write(data)
        data = buffer.getvalue()
    path.write_bytes(data)


@functools.lru_cache(maxsize=1)
def load_corpus() -> str:
    """The shipped corpus text (``hf_lars/demo/corpus.txt.gz``), read once and cached.

    If the package data is missing (a source checkout without it), the corpus is rebuilt in memory from
    this interpreter's stdlib with a warning; it then differs from the shipped one on other Python versions.
    """
    if CORPUS_PATH.is_file():
        with gzip.open(CORPUS_PATH, "rt", encoding="utf-8") as f:
            return f.read()
    logger.warning("%s is missing; rebuilding the corpus from this interpreter's stdlib", CORPUS_PATH)
    return build_stdlib_corpus(None)


def corpus_paragraphs(text: str | None = None) -> list[str]:
    """Split a corpus (default :func:`load_corpus`) into its non-empty paragraphs (blank-line separated)."""
    text = load_corpus() if text is None else text
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def corpus_datasets(validation_fraction: float = 0.05, seed: int = 0) -> datasets.DatasetDict:
    """The corpus as a ``DatasetDict`` with ``train`` and ``validation`` splits of paragraphs (column ``text``).

    ``round(validation_fraction * n)`` paragraphs (at least 1) are drawn for validation with
    ``random.Random(seed)``; both splits keep corpus order. Fully offline and deterministic.
    """
    import datasets

    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"Invalid validation_fraction: {validation_fraction} (must be in (0, 1))")
    paragraphs = corpus_paragraphs()
    n_val = max(1, round(validation_fraction * len(paragraphs)))
    if n_val >= len(paragraphs):
        raise ValueError(f"validation_fraction={validation_fraction} leaves no training paragraphs")
    val_idx = set(random.Random(seed).sample(range(len(paragraphs)), n_val))
    train = [p for i, p in enumerate(paragraphs) if i not in val_idx]
    val = [p for i, p in enumerate(paragraphs) if i in val_idx]
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": train}), "validation": datasets.Dataset.from_dict({"text": val})}
    )


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------
def _tokenizer_key(texts: list[str], vocab_size: int, min_frequency: int) -> str:
    digest = hashlib.sha256(f"v{_TOKENIZER_FORMAT}|{vocab_size}|{min_frequency}|{len(texts)}".encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _wrap_fast(tokenizer_object: Any) -> transformers.PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    cache_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    GPT-2 style: byte-level pre-tokenisation (no prefix space) so every string round-trips exactly and
    nothing is ever unknown; special tokens ``<pad>`` (id 0), ``<s>`` (1), ``</s>`` (2), set as the pad, bos and
    eos tokens. No special tokens are added on encoding (:func:`tokenize_and_group` appends ``</s>``).
    Training is deterministic for the same texts and settings.

    Args:
        texts: training texts (materialised into a list).
        vocab_size: total vocabulary including the 256 byte symbols and the 3 special tokens.
        cache_dir: if given, a directory holding the trained tokenizer (``save_pretrained`` format): reused
            when it was trained on the same texts and settings, otherwise retrained and overwritten.
        min_frequency: least count of a pair to be merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"Invalid vocab_size: {vocab_size} (must be >= {256 + len(SPECIAL_TOKENS)})")
    key = _tokenizer_key(texts, vocab_size, min_frequency)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None and (cache / _TOKENIZER_KEY_FILE).is_file() and (cache / "tokenizer.json").is_file():
        stored = json.loads((cache / _TOKENIZER_KEY_FILE).read_text())
        if stored.get("key") == key:
            logger.info("loading cached tokenizer from %s", cache)
            return _wrap_fast(Tokenizer.from_file(str(cache / "tokenizer.json")))
        logger.info("tokenizer cache %s was built from other texts/settings; retraining", cache)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    logger.info("trained a byte-level BPE with %d tokens on %d texts", tokenizer.get_vocab_size(), len(texts))
    fast = _wrap_fast(tokenizer)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(cache / "tokenizer.json"))
        fast.save_pretrained(str(cache))
        (cache / _TOKENIZER_KEY_FILE).write_text(
            json.dumps({"key": key, "vocab_size": vocab_size, "min_frequency": min_frequency}) + "\n"
        )
    return fast


# ----------------------------------------------------------------------------------------------------------
# causal-LM preprocessing
# ----------------------------------------------------------------------------------------------------------
def tokenize_and_group(
    dataset_dict: datasets.DatasetDict,
    tokenizer: transformers.PreTrainedTokenizerBase,
    block_size: int = 128,
    *,
    text_column: str = "text",
) -> datasets.DatasetDict:
    """Tokenize every split and regroup it into fixed-length blocks for causal-LM training (``run_clm.py``).

    Each text becomes its token ids followed by ``eos_token_id`` (documents stay separated); each batch of
    1000 texts is concatenated and cut into blocks of ``block_size`` tokens, the remainder dropped. Columns:
    ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (a copy of ``input_ids``; the model shifts).
    """
    if block_size < 2:
        raise ValueError(f"Invalid block_size: {block_size} (must be >= 2)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer needs an eos_token")

    def _tokenize(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [eos] for row in ids]}

    def _group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        flat = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, usable, block_size)]
        return {
            "input_ids": blocks,
            "attention_mask": [[1] * block_size for _ in blocks],
            "labels": [list(b) for b in blocks],
        }

    import datasets

    out = {}
    for split, dataset in dataset_dict.items():
        tokenized = dataset.map(_tokenize, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {split}")
        grouped = tokenized.map(_group, batched=True, batch_size=1000, desc=f"group {split} into {block_size} blocks")
        if len(grouped) == 0:
            logger.warning("split %r has fewer than block_size=%d tokens: no blocks", split, block_size)
        out[split] = grouped
    return datasets.DatasetDict(out)
