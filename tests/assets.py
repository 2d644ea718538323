"""Offline test assets: real CLIP BPE files and a tiny T5-style SentencePiece model.

`make_tokenizer_folders(root)` writes diffusers-style `tokenizer/` (CLIP-L), `tokenizer_2/` (CLIP-G)
and `tokenizer_3/` (T5) folders under `root`. The CLIP files are the real ones, rebuilt from the
BPE list shipped in the `open_clip_torch==3.3.0` wheel; they are checked against the
byte sizes of the published `vocab.json` / `merges.txt`. The T5 model is a tiny unigram model
trained here (no public wheel ships T5's `spiece.model`); it has T5's special ids
(`<pad>`=0, `</s>`=1, `<unk>`=2) and T5's normalisation settings, so it tests the plumbing.

Everything is built once and cached in `$SD35_TEST_ASSETS` or `~/.cache/sd35_mlx_tests/`.
Fixtures (session scoped): `tokenizer_root` (a folder holding the three tokenizer folders).
Use them from a test module with `from assets import tokenizer_root  # noqa: F401`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
OPEN_CLIP_BPE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_BYTES = 1_059_962  # published tokenizer/vocab.json (hub listing)
CLIP_MERGES_BYTES = 524_619  # published tokenizer/merges.txt
CLIP_VOCAB_SIZE = 49408
CLIP_MERGE_COUNT = 48894

T5_TINY_VOCAB = 400
T5_EXTRA_IDS = 100


def cache_dir() -> Path:
    root = os.environ.get("SD35_TEST_ASSETS")
    path = Path(root) if root else Path.home() / ".cache" / "sd35_mlx_tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    # Another test process may build the same cache at the same time: never expose half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# CLIP BPE (real files)


def _bytes_to_unicode() -> list[str]:
    """OpenAI's byte -> printable-character table, in its order (the first 256 vocab entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, chars, extra = printable[:], printable[:], 0
    for b in range(256):
        if b not in codes:
            codes.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _download_open_clip_bpe() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", OPEN_CLIP_WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("open_clip_torch-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"Could not download {OPEN_CLIP_WHEEL} from PyPI to build the CLIP tokenizer test files "
                f"(`{' '.join(cmd)}` exited {result.returncode}): {result.stderr.strip()[-500:]}\n"
                "Tests need PyPI access once; or put vocab.json + merges.txt into "
                f"{cache_dir() / 'clip'}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(OPEN_CLIP_BPE)


def build_clip_bpe_files(bpe_gz: bytes) -> tuple[bytes, bytes]:
    """Rebuild HF `vocab.json` and `merges.txt` from OpenAI's BPE list, as SimpleTokenizer does."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE and len(merges) == CLIP_MERGE_COUNT
    # Formatting of the published files (indent 2, raw unicode, trailing newline): byte sizes match.
    vocab_json = (json.dumps(vocab, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    merges_txt = ("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n").encode("utf-8")
    return vocab_json, merges_txt


def clip_bpe_files() -> tuple[Path, Path]:
    """Paths of the cached real CLIP `vocab.json` and `merges.txt` (downloaded/built once)."""
    folder = cache_dir() / "clip"
    folder.mkdir(exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.exists() and merges_path.exists()):
        vocab_json, merges_txt = build_clip_bpe_files(_download_open_clip_bpe())
        _write_atomic(vocab_path, vocab_json)
        _write_atomic(merges_path, merges_txt)
    sizes = (vocab_path.stat().st_size, merges_path.stat().st_size)
    if sizes != (CLIP_VOCAB_BYTES, CLIP_MERGES_BYTES):
        raise RuntimeError(
            f"Cached CLIP files in {folder} have sizes {sizes}, expected "
            f"{(CLIP_VOCAB_BYTES, CLIP_MERGES_BYTES)}; delete the folder to rebuild them."
        )
    return vocab_path, merges_path


def _added_token(content: str, normalized: bool, special: bool | None = None) -> dict:
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    if special is not None:
        token["special"] = special
    return token


def clip_config_files(pad_token: str) -> dict[str, str]:
    """`special_tokens_map.json` and `tokenizer_config.json` as published for SD3/SD3.5.

    The layout reproduces the published byte sizes exactly (588/705 B for `tokenizer/`,
    576/856 B for `tokenizer_2/`, as the hub lists them): `<|startoftext|>` normalized, the others not,
    and in `tokenizer_2/` the pad token `!` (id 0) is a declared special token.
    """
    special_map = {
        "bos_token": _added_token("<|startoftext|>", True),
        "eos_token": _added_token("<|endoftext|>", False),
        "pad_token": _added_token(pad_token, False),
        "unk_token": _added_token("<|endoftext|>", False),
    }
    decoder = {}
    if pad_token == "!":
        decoder["0"] = _added_token("!", False, True)
    decoder["49406"] = _added_token("<|startoftext|>", True, True)
    decoder["49407"] = _added_token("<|endoftext|>", False, True)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    return {
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


# --------------------------------------------------------------------------------------------
# Tiny T5 SentencePiece model


_WORDS = (
    "a photo of an astronaut riding horse on mars cat dog sitting in the garden painting portrait "
    "city night rain neon light beautiful landscape mountain river forest sunset sky cloud blue red "
    "green golden hour cinematic detailed highly realistic oil canvas watercolor sketch drawing of "
    "with and by at under over small large old young woman man child robot castle dragon ship sea "
    "Photo Cat Dog The A New York Paris Tokyo café naïve über São Paulo 2024 1girl 4k 8k HDR "
    "it's don't we're I'm they'll he'd ! !! ? , . ; : ( ) - -- ' \" / & % $ # @ 100% 3.5"
).split()


_SYLLABLES = "ka lo mi ne ru sa ti vo ze pa bel dor fen gri hal jun kor lum mar nix ost pre qua rin sto".split()


def _tiny_corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    # Real words plus made-up ones so the trainer has enough distinct pieces for the vocab size.
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words = list(_WORDS) + made_up
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(sentences)]


def build_tiny_spiece_model() -> bytes:
    """Train a tiny unigram model with T5's special ids and normalisation settings."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_TINY_VOCAB,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tiny_spiece_model() -> Path:
    path = cache_dir() / "t5_tiny" / "spiece.model"
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        _write_atomic(path, build_tiny_spiece_model())
    return path


def t5_config_files(vocab_size: int, extra_ids: int = T5_EXTRA_IDS) -> dict[str, str]:
    """T5-style configs: `<pad>`/`</s>`/`<unk>` = 0/1/2 and `<extra_id_i>` = vocab_size + extra_ids-1-i."""
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    decoder = {
        "0": _added_token("<pad>", False, True),
        "1": _added_token("</s>", False, True),
        "2": _added_token("<unk>", False, True),
    }
    for i in range(extra_ids):  # T5 numbers sentinels downwards from the top of the vocab
        decoder[str(vocab_size + extra_ids - 1 - i)] = _added_token(sentinels[i], False, True)
    special_map = {
        "additional_special_tokens": sentinels,
        "eos_token": _added_token("</s>", False),
        "pad_token": _added_token("<pad>", False),
        "unk_token": _added_token("<unk>", False),
    }
    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
        "additional_special_tokens": sentinels,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": extra_ids,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    return {
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


# --------------------------------------------------------------------------------------------
# Folders


def make_tokenizer_folders(root: Path) -> None:
    """Write diffusers-style `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` under `root`."""
    root = Path(root)
    vocab_path, merges_path = clip_bpe_files()
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vocab_path, folder / "vocab.json")
        shutil.copyfile(merges_path, folder / "merges.txt")
        for filename, text in clip_config_files(pad).items():
            (folder / filename).write_text(text, encoding="utf-8")
    folder = root / "tokenizer_3"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tiny_spiece_model(), folder / "spiece.model")
    for filename, text in t5_config_files(T5_TINY_VOCAB).items():
        (folder / filename).write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def tokenizer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` (real CLIP BPE, tiny T5)."""
    root = tmp_path_factory.mktemp("tokenizers")
    make_tokenizer_folders(root)
    return root
