"""HuggingFaceTokenizer: a tokenizer saved in a local directory (through `transformers` when
installed) or a tokenizer.json file (through `tokenizers`). Never downloads: a name that is not a
local path is an error naming --tokenizer-model.

As in Megatron-LM (spec §1.7), text is encoded with the tokenizer's default special tokens (e.g.
a Llama BOS) unless `include_special_tokens` is False (--tokenizer-hf-no-include-special-tokens);
`use_fast=False` (--tokenizer-hf-no-use-fast) loads the slow Python tokenizer through
`transformers`."""
from __future__ import annotations

import os

from megatron_lite.data.tokenizers.base import TokenizerError, identity


class HuggingFaceTokenizer:
    def __init__(self, path: str | None, trust_remote_code: bool = False, use_fast: bool = True,
                 include_special_tokens: bool = True):
        if path is None:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
        if not os.path.exists(path):
            raise TokenizerError(f"--tokenizer-model {path}: no such local directory or file (downloads "
                                 "are disabled: save the tokenizer with save_pretrained() and pass that "
                                 "directory)")
        self._path = path
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None and os.path.isdir(path):
            try:
                self._tok = transformers.AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=trust_remote_code, use_fast=use_fast)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"--tokenizer-model {path}: not a Hugging Face tokenizer "
                                     f"({e})") from None
            self._encode = lambda text: self._tok(text, add_special_tokens=include_special_tokens).input_ids
            self._decode = self._tok.decode
            self._vocab_size = len(self._tok)
            self._ids = (self._tok.eos_token_id, self._tok.bos_token_id, self._tok.pad_token_id)
            return
        if not use_fast:  # the `tokenizers` library is the fast (Rust) implementation only
            raise TokenizerError(f"--tokenizer-hf-no-use-fast needs `transformers` and a tokenizer directory "
                                 f"as --tokenizer-model (got {path})")
        self._init_tokenizers(path, include_special_tokens)

    def _init_tokenizers(self, path: str, include_special_tokens: bool) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs `transformers` or `tokenizers` "
                                 "(pip install tokenizers)") from None
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust library raises its own exception type
            raise TokenizerError(f"--tokenizer-model {path}: cannot load {file} ({e})") from None
        self._tok = tok
        self._encode = lambda text: tok.encode(text, add_special_tokens=include_special_tokens).ids
        self._decode = lambda ids: tok.decode(list(ids))
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)
        def find(*names):
            return next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)

        self._ids = (find("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>"),
                     find("<s>", "<bos>", "<|begin_of_text|>"), find("<pad>", "[PAD]"))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int | None:
        return self._ids[0]

    @property
    def bos(self) -> int | None:
        return self._ids[1]

    @property
    def pad(self) -> int | None:
        return self._ids[2]

    @property
    def unique_identifiers(self) -> dict:
        return identity(self, tokenizer_path=self._path)

    def tokenize(self, text: str) -> list[int]:
        return list(self._encode(text))

    def detokenize(self, ids) -> str:
        return self._decode([int(i) for i in ids])
