"""Tokenizers for the checkpoints we load, built with what ``transformers`` already offers.

A Hugging Face folder carries ``tokenizer.json``/``tokenizer_config.json``: ``AutoTokenizer``
reads them (chat template included). A GGUF file carries its vocabulary, merges, special ids and
chat template as metadata; transformers knows how to turn that into a fast tokenizer (the same
conversion ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` uses). We call the conversion
directly because the public route also parses the whole file's metadata a second time with
``gguf.GGUFReader``, which takes about 5 s on the 49k-token default model; the result is the
same tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teal.errors import CorruptCheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["tokenizer_from_gguf", "tokenizer_from_hf_folder"]

_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
)


def tokenizer_from_hf_folder(folder: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has no tokenizer files at all."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in _HF_TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        # Never code from the checkpoint (trust_remote_code) and never the network here: the
        # files are local, and a missing one is the folder's problem, not a download to try.
        return AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        raise CorruptCheckpointError(
            f"cannot build the tokenizer of {folder}: {type(e).__name__}: {e}. Check that "
            "tokenizer.json (or tokenizer.model with the sentencepiece package installed) and "
            "tokenizer_config.json are complete, or remove them to load the weights without one"
        ) from e


def tokenizer_from_gguf(
    path: str | os.PathLike, metadata: Mapping[str, Any] | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a GGUF file's metadata (``tokenizer.ggml.*``), with its chat
    template (``tokenizer.chat_template``) when the file has one. ``metadata``, when the caller
    has already parsed it, lets older transformers releases be corrected (see below)."""
    path = Path(path)
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # older transformers: the public (slower) route
        tok = _tokenizer_from_gguf_public(path)
        if metadata is not None:
            # transformers 4.x can name the wrong special tokens and adds BOS to byte-level
            # GGUF vocabularies whatever the file says (SmolLM2's says no): apply the file's
            # special token ids and add_bos/add_eos flags ourselves.
            _apply_special_tokens(tok, metadata)
            _apply_bos_eos_flags(
                tok,
                metadata.get("tokenizer.ggml.add_bos_token"),
                metadata.get("tokenizer.ggml.add_eos_token"),
            )
        return tok
    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedModelError(
            f"cannot build a tokenizer from the metadata of {path}: {e}. transformers supports "
            "GGUF tokenizers of type gpt2 (byte-level BPE), llama (sentencepiece) and t5"
        ) from e


def _tokenizer_from_gguf_public(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as e:
        raise UnsupportedModelError(
            f"cannot build a tokenizer from the metadata of {path}: {type(e).__name__}: {e}"
        ) from e


def _apply_special_tokens(tok: PreTrainedTokenizerBase, metadata: Mapping[str, Any]) -> None:
    n = len(tok)
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                      ("padding", "pad_token")):  # fmt: skip
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < n:
            setattr(tok, attr, tok.convert_ids_to_tokens(token_id))


def _apply_bos_eos_flags(
    tok: PreTrainedTokenizerBase, add_bos: bool | None, add_eos: bool | None
) -> None:
    """Make encoding add BOS/EOS exactly as the file's flags say (unset flags: leave as is)."""
    from tokenizers import processors

    ids = tok("a")["input_ids"]
    bos, eos = tok.bos_token, tok.eos_token
    if add_bos is None:
        add_bos = bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    if add_eos is None:
        add_eos = bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id
    head = [f"{bos}:0"] if add_bos and bos else []
    tail = [f"{eos}:0"] if add_eos and eos else []
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in {*([bos] if head else []),
                                                            *([eos] if tail else [])}]  # fmt: skip
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join([*head, "$A:0", *tail]),
        pair=" ".join([*head, "$A:0", *tail, "$B:1"]),
        special_tokens=specials,
    )
