"""Tokenizers for SD3's three text encoders: CLIP-L, CLIP-G (byte-level BPE) and T5 (SentencePiece).

They read diffusers' `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` folders and yield exactly the ids of
transformers' `CLIPTokenizer` / `T5Tokenizer` as diffusers' SD3 pipeline calls them
(`padding="max_length", truncation=True`), without depending on transformers.

Token rules (docs/text.md): CLIP-L pads with `<|endoftext|>` (49407); CLIP-G pads with `!` (id 0), and because
`tokenizer_2/` declares `!` a *special* token, every `!` in a prompt is cut out before BPE and
becomes id 0 (`"hello!!"` -> `hello</w>, 0, 0` instead of `hello</w>, !!</w>`). We reproduce that
from the folder's files; `pad_is_special=False` gives the open_clip / SAI tokenization instead.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE, Unigram

from .components import T5_DEFAULT_LENGTH
from .errors import InputError

CLIP_MAX_LENGTH = 77
T5_MIN_LENGTH, T5_MAX_LENGTH = 77, 512

# OpenAI CLIP's pre-tokenization pattern (as in transformers' CLIPTokenizer).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class TokenizedBatch:
    """Fixed-length token ids for a batch of prompts, and what truncation cut off."""

    ids: np.ndarray  # (B, L) int32, specials and padding included
    lengths: np.ndarray  # (B,) int32, tokens before padding (specials included)
    dropped: tuple[int, ...]  # tokens removed by truncation, per prompt
    dropped_text: tuple[str, ...]  # their decoded text ("" when nothing was dropped)

    def truncation_warnings(self, name: str) -> list[str]:
        """One line per truncated prompt, e.g. "CLIP-L: prompt truncated, 12 tokens dropped: '…'"."""
        return [
            f"{name}: prompt {i} truncated, {n} tokens dropped: {text!r}"
            if len(self.dropped) > 1
            else f"{name}: prompt truncated, {n} tokens dropped: {text!r}"
            for i, (n, text) in enumerate(zip(self.dropped, self.dropped_text))
            if n > 0
        ]


def _fixed_length(
    token_lists: Sequence[list[int]],
    max_length: int,
    prefix: list[int],
    suffix: list[int],
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """prefix + first tokens + suffix, padded to max_length (transformers' truncation=True)."""
    room = max_length - len(prefix) - len(suffix)
    ids = np.full((len(token_lists), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(token_lists), dtype=np.int32)
    dropped = []
    for row, tokens in enumerate(token_lists):
        kept = prefix + tokens[:room] + suffix
        ids[row, : len(kept)] = kept
        lengths[row] = len(kept)
        dropped.append(tokens[room:])
    return ids, lengths, dropped


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("Prompts must be strings.")
    return prompts


# --------------------------------------------------------------------------------------------
# Config files


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"Cannot read tokenizer file {path}: {e}") from e


def _read_folder_config(folder: Path) -> dict:
    """tokenizer_config.json overlaid with special_tokens_map.json (as transformers loads them).

    The added tokens of a tokenizer.json (with their flags) join `added_tokens_decoder`:
    folders saved by transformers 5 keep them only there.
    """
    config = _read_json(folder / "tokenizer_config.json")
    config.update(_read_json(folder / "special_tokens_map.json"))
    if (folder / "tokenizer.json").exists():
        added = {str(t["id"]): t for t in _read_json(folder / "tokenizer.json").get("added_tokens", [])}
        config["added_tokens_decoder"] = {**added, **(config.get("added_tokens_decoder") or {})}
    return config


def _token_text(value: Any) -> str | None:
    if value is None:
        return None
    return value["content"] if isinstance(value, dict) else str(value)


def _added_token(value: Any, special: bool = True) -> AddedToken:
    """An AddedToken from a config entry (a string, or a dict with content and flags)."""
    if isinstance(value, dict):
        return AddedToken(
            value["content"],
            single_word=value.get("single_word", False),
            lstrip=value.get("lstrip", False),
            rstrip=value.get("rstrip", False),
            normalized=value.get("normalized", False),
            special=value.get("special", special),
        )
    # transformers' default for special tokens named by a plain string
    return AddedToken(str(value), special=special, normalized=False)


def _config_added_tokens(config: dict, named: Sequence[str]) -> list[tuple[int | None, AddedToken]]:
    """Tokens transformers adds to the vocabulary: `added_tokens_decoder`, then named specials."""
    tokens: list[tuple[int | None, AddedToken]] = []
    seen: set[str] = set()
    decoder = config.get("added_tokens_decoder") or {}
    for index, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        token = _added_token(value)
        tokens.append((int(index), token))
        seen.add(token.content)
    # "extra_special_tokens" is transformers 5's name for "additional_special_tokens"
    extra = list(config.get("additional_special_tokens") or []) + list(config.get("extra_special_tokens") or [])
    for value in [config.get(key) for key in named] + extra:
        text = _token_text(value)
        if text is not None and text not in seen:
            tokens.append((None, _added_token(value)))
            seen.add(text)
    return tokens


def _max_length(config: dict, default: int) -> int:
    value = config.get("model_max_length")
    # transformers writes a huge sentinel when no length is known
    return int(value) if isinstance(value, int) and 0 < value < 100_000 else default


# --------------------------------------------------------------------------------------------
# CLIP


class CLIPTokenizer:
    """Byte-level BPE of OpenAI CLIP: BOS + ≤ max_length-2 tokens + EOS, padded with `pad_id`."""

    def __init__(self, backend: Tokenizer, bos_id: int, eos_id: int, pad_id: int, max_length: int = CLIP_MAX_LENGTH):
        if max_length < 2:
            raise InputError(f"CLIP max_length must be at least 2, got {max_length}.")
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.max_length = max_length

    @staticmethod
    def _backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk_token,
            )
        )
        # CLIP cleans whitespace and lower-cases before splitting into words.
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        return backend

    @classmethod
    def _build(
        cls,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        config: dict,
        max_length: int,
    ) -> CLIPTokenizer:
        bos = _token_text(config.get("bos_token")) or "<|startoftext|>"
        eos = _token_text(config.get("eos_token")) or "<|endoftext|>"
        unk = _token_text(config.get("unk_token")) or eos
        pad = _token_text(config.get("pad_token")) or eos
        backend = cls._backend(vocab, merges, unk)
        for _, token in _config_added_tokens(config, ("bos_token", "eos_token", "unk_token", "pad_token")):
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
        ids = [backend.token_to_id(t) for t in (bos, eos, pad)]
        if None in ids:
            missing = [t for t, i in zip((bos, eos, pad), ids) if i is None]
            raise InputError(f"CLIP tokenizer: special tokens {missing} are not in the vocabulary.")
        return cls(backend, *ids, max_length=max_length)

    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        pad_token: str | int = "<|endoftext|>",
        *,
        pad_is_special: bool = True,
        max_length: int = CLIP_MAX_LENGTH,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
    ) -> CLIPTokenizer:
        """From `vocab.json` + `merges.txt`. CLIP-L: pad `<|endoftext|>`; CLIP-G: pad `"!"` (or 0).

        `pad_is_special=True` declares the pad token special as diffusers' `tokenizer_2/` does, so
        `!` in prompts tokenizes to 0; False gives open_clip's / SAI's tokenization of `!`.
        """
        vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
        if isinstance(pad_token, int):
            by_id = {i: t for t, i in vocab.items()}
            if pad_token not in by_id:
                raise InputError(f"CLIP pad id {pad_token} is not in the vocabulary ({len(vocab)} entries).")
            pad_token = by_id[pad_token]
        config: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": eos_token}
        config["added_tokens_decoder"] = {
            str(vocab[bos_token]): {"content": bos_token, "normalized": True},
            str(vocab[eos_token]): {"content": eos_token, "normalized": False},
        }
        if pad_is_special:
            config["pad_token"] = pad_token
        tokenizer = cls._build(vocab, merges, config, max_length)
        tokenizer.pad_id = vocab[pad_token]
        return tokenizer

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None) -> CLIPTokenizer:
        """From a diffusers `tokenizer/` or `tokenizer_2/` folder (pad token and length from its configs)."""
        folder = Path(path)
        vocab_path, merges_path, json_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        if vocab_path.exists() and merges_path.exists():
            vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
        elif json_path.exists():  # folders saved by transformers 5 carry only tokenizer.json
            model = _read_json(json_path).get("model", {})
            vocab = model.get("vocab")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            if model.get("type") != "BPE" or not isinstance(vocab, dict):
                raise InputError(f"{json_path} is not a BPE tokenizer (CLIP needs vocab + merges).")
        else:
            raise InputError(f"No CLIP tokenizer in {folder}: expected vocab.json + merges.txt (or tokenizer.json).")
        config = _read_folder_config(folder)
        return cls._build(vocab, merges, config, max_length or _max_length(config, CLIP_MAX_LENGTH))

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS, padding or truncation."""
        return self.backend.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=False)
        return text.replace("</w>", " ").strip()

    def tokenize(self, prompts: str | Sequence[str]) -> TokenizedBatch:
        prompts = _as_list(prompts)
        encoded = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=False)]
        ids, lengths, dropped = _fixed_length(encoded, self.max_length, [self.bos_id], [self.eos_id], self.pad_id)
        return TokenizedBatch(
            ids, lengths, tuple(len(d) for d in dropped), tuple(self.decode(d) if d else "" for d in dropped)
        )

    __call__ = tokenize


# --------------------------------------------------------------------------------------------
# T5


class T5Tokenizer:
    """T5 SentencePiece unigram: tokens + `</s>`, padded with `<pad>` to exactly `max_length`.

    Special tokens written in a prompt (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`) are cut out and
    mapped to their ids as transformers does; the text between them is tokenized separately.
    """

    def __init__(
        self,
        encode_fn: Callable[[list[str]], list[list[int]]],
        decode_fn: Callable[[list[int]], str],
        special_ids: dict[str, int],
        eos_id: int = 1,
        pad_id: int = 0,
        max_length: int = T5_DEFAULT_LENGTH,
    ):
        if not T5_MIN_LENGTH <= max_length <= T5_MAX_LENGTH:
            raise InputError(f"T5 max_length must be between {T5_MIN_LENGTH} and {T5_MAX_LENGTH}, got {max_length}.")
        self._encode_text = encode_fn  # list[str] -> list[list[int]], text without special tokens
        self._decode_text = decode_fn  # list[int] -> str, ids of ordinary pieces
        self.special_ids = special_ids
        self._special_by_id = {i: t for t, i in special_ids.items()}
        # leftmost-longest match, like the tokenizers library's added-token split
        names = sorted(special_ids, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in names)) if names else None
        self.eos_id, self.pad_id, self.max_length = eos_id, pad_id, max_length

    @staticmethod
    def _special_ids(config: dict, vocab_size: int, piece_id) -> dict[str, int]:
        """Ids of the special tokens, as transformers assigns them.

        `added_tokens_decoder` ids win; `</s>`/`<pad>`/`<unk>` are pieces of the model; the
        sentinels `<extra_id_i>` (config `extra_ids`, default 100) sit above the vocab, numbered
        downwards: `<extra_id_0>` = vocab_size + extra_ids - 1.
        """
        ids: dict[str, int] = {}
        for index, token in _config_added_tokens(config, ("eos_token", "unk_token", "pad_token")):
            index = index if index is not None else piece_id(token.content)
            if index is not None:
                ids[token.content] = index
        extra_ids = int(config.get("extra_ids", 100))
        for i in range(extra_ids):
            name = f"<extra_id_{i}>"
            if name not in ids:
                index = piece_id(name)
                ids[name] = index if index is not None else vocab_size + extra_ids - 1 - i
        return ids

    @classmethod
    def from_file(
        cls,
        spiece_model: str | Path,
        max_length: int = T5_DEFAULT_LENGTH,
        *,
        config: dict | None = None,
    ) -> T5Tokenizer:
        """From a SentencePiece `spiece.model` (T5: `<pad>`=0, `</s>`=1, `<unk>`=2, 100 sentinels)."""
        import sentencepiece as spm

        path = Path(spiece_model)
        if not path.exists():
            raise InputError(f"SentencePiece model not found: {path}")
        sp = spm.SentencePieceProcessor(model_file=str(path))
        vocab_size = sp.get_piece_size()

        def piece_id(text: str) -> int | None:
            i = sp.piece_to_id(text)
            return None if sp.is_unknown(i) and text != sp.id_to_piece(i) else i

        config = _with_t5_defaults(config)
        special_ids = cls._special_ids(config, vocab_size, piece_id)
        eos_id = special_ids[_token_text(config["eos_token"])]
        pad_id = special_ids[_token_text(config["pad_token"])]

        def encode(texts: list[str]) -> list[list[int]]:
            return sp.encode(texts)

        def decode(ids: list[int]) -> str:
            return sp.decode([i for i in ids if i < vocab_size])

        return cls(encode, decode, special_ids, eos_id, pad_id, max_length)

    @classmethod
    def _from_tokenizer_json(cls, path: Path, config: dict, max_length: int) -> T5Tokenizer:
        """From a `tokenizer.json` only, built as transformers 5's T5Tokenizer rebuilds it."""
        data = _read_json(path)
        model = data.get("model", {})
        if model.get("type") != "Unigram":
            raise InputError(f"{path} is not a Unigram (SentencePiece) tokenizer.")
        vocab = [tuple(item) for item in model["vocab"]]
        backend = Tokenizer(Unigram(vocab, unk_id=model.get("unk_id", 2), byte_fallback=False))
        charsmap = _precompiled_charsmap(data.get("normalizer"))
        if charsmap is not None:
            backend.normalizer = normalizers.Precompiled(base64.b64decode(charsmap))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
        )
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        pieces = {piece: i for i, (piece, _) in enumerate(vocab)}
        for token in data.get("added_tokens", []):
            pieces.setdefault(token["content"], token["id"])
        config = _with_t5_defaults(config)
        special_ids = cls._special_ids(config, len(vocab), pieces.get)
        eos_id = special_ids[_token_text(config["eos_token"])]
        pad_id = special_ids[_token_text(config["pad_token"])]

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

        def decode(ids: list[int]) -> str:
            return backend.decode([i for i in ids if i < len(vocab)])

        return cls(encode, decode, special_ids, eos_id, pad_id, max_length)

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = T5_DEFAULT_LENGTH) -> T5Tokenizer:
        """From a diffusers `tokenizer_3/` folder (`spiece.model`, else `tokenizer.json`)."""
        folder = Path(path)
        config = _read_folder_config(folder)
        if (folder / "spiece.model").exists():
            return cls.from_file(folder / "spiece.model", max_length, config=config)
        if (folder / "tokenizer.json").exists():
            return cls._from_tokenizer_json(folder / "tokenizer.json", config, max_length)
        raise InputError(f"No T5 tokenizer in {folder}: expected spiece.model (or tokenizer.json).")

    def _split_special(self, prompt: str) -> list[str | int]:
        if self._special_re is None:
            return [prompt]
        parts: list[str | int] = []
        start = 0
        for match in self._special_re.finditer(prompt):
            parts += [prompt[start : match.start()], self.special_ids[match.group()]]
            start = match.end()
        return parts + [prompt[start:]]

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, without `</s>`, padding or truncation."""
        return self._encode_many([prompt])[0]

    def _encode_many(self, prompts: list[str]) -> list[list[int]]:
        split = [self._split_special(p) for p in prompts]
        texts = [part for parts in split for part in parts if isinstance(part, str)]
        pieces = iter(self._encode_text(texts))
        return [[i for part in parts for i in ([part] if isinstance(part, int) else next(pieces))] for parts in split]

    def decode(self, ids: Sequence[int]) -> str:
        text, run = [], []
        for i in ids:
            if i in self._special_by_id:
                text += [self._decode_text(run), self._special_by_id[i]]
                run = []
            else:
                run.append(i)
        text.append(self._decode_text(run))
        return " ".join(t for t in text if t)

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenizedBatch:
        """Ids padded/truncated to `max_length` (default: this tokenizer's, diffusers' 256)."""
        length = self.max_length if max_length is None else max_length
        if not T5_MIN_LENGTH <= length <= T5_MAX_LENGTH:
            raise InputError(f"T5 max_length must be between {T5_MIN_LENGTH} and {T5_MAX_LENGTH}, got {length}.")
        prompts = _as_list(prompts)
        encoded = self._encode_many(prompts)
        ids, lengths, dropped = _fixed_length(encoded, length, [], [self.eos_id], self.pad_id)
        return TokenizedBatch(
            ids, lengths, tuple(len(d) for d in dropped), tuple(self.decode(d) if d else "" for d in dropped)
        )

    __call__ = tokenize


def _with_t5_defaults(config: dict | None) -> dict:
    return {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", **(config or {})}


def _precompiled_charsmap(normalizer: dict | None) -> str | None:
    """The base64 charsmap of a `Precompiled` normalizer in a tokenizer.json (possibly in a Sequence)."""
    if not normalizer:
        return None
    items = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for item in items:
        if item.get("type") == "Precompiled" and item.get("precompiled_charsmap"):
            return item["precompiled_charsmap"]
    return None
