"""What ``hf-lars demo`` needs, in one place, shipped with the package and working offline.

- :mod:`.corpus`: the embedded corpus (``corpus.txt.gz`` + its ``README.md``: CPython 3.11 docstrings), its
  train/validation split, a deterministic byte-level BPE and the causal-LM block grouping;
- :mod:`.model`: the tiny Llama builder (no hub weights);
- :mod:`.settings`: the demo's tuned LR table and sizes;
- :mod:`.run`: the training itself (``hf_lars.commands.demo`` only parses flags).

The recipes use the corpus and model too; code only experiments need lives in ``recipes/``.
"""

from __future__ import annotations

from hf_lars.demo.corpus import (
    BOS_TOKEN,
    CORPUS_PATH,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_stdlib_corpus,
    corpus_datasets,
    corpus_paragraphs,
    load_corpus,
    tokenize_and_group,
    train_tokenizer,
)
from hf_lars.demo.model import build_model, tiny_llama_config

from hf_lars.demo import corpus, model  # noqa: E402 - after the names, for __all__

__all__ = [*corpus.__all__, *model.__all__]
