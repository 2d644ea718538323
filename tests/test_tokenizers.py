"""Our CLIP / T5 tokenizers give exactly transformers' ids for the same files, as diffusers calls them."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import assets
from assets import tokenizer_root  # noqa: F401  (session fixture)
from sd35_mlx.errors import InputError
from sd35_mlx.tokenizers import CLIPTokenizer, T5Tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "!",
    "! !! !!!",
    "hello!! what a day!!!",
    "Wow!Amazing!",
    "A PHOTO OF A CAT, Highly Detailed, 8K",
    "  extra   whitespace\there\n\nand  newlines  ",
    "café über naïve São Paulo — 日本語のテキスト 😀🎨 Ωμέγα",
    "it's a dog's life, isn't it? we'll see (masterpiece:1.2) [blue] {x} 100% #tag @user",
    "literal <|endoftext|> in the middle and <|startoftext|> too, <|STARTOFTEXT|> upper",
    "t5 specials <extra_id_0> x</s>y <pad> z <unk> <extra_id_99>",
    "1girl, 4k, HDR, 3.5 x 2 = 7",
    " ".join(["word"] * 80),  # truncated by CLIP (75 room) but not by T5 at 256
    "a very long prompt " * 60,  # truncated by everything below 512
    "supercalifragilisticexpialidocious" * 12,
]


def _random_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["cat", "Dog", "!", "!!", "?", ",", ".", " ", "  ", "\t", "\n", "é", "ß", "日本", "😀", "'s",
              "can't", "<extra_id_3>", "</s>", "<|endoftext|>", "RED", "x1", "42", "-", "_", "(", ")", "ａｂｃ",
              "①"]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _hf_fixed(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    # the call diffusers' SD3 pipeline makes (_get_clip_prompt_embeds / _get_t5_prompt_embeds)
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
    return np.array(out.input_ids)


def _hf_untruncated(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in prompts]


# ---------------------------------------------------------------------------------------------
# assets


def test_clip_assets_are_the_published_files(tokenizer_root):
    folder = tokenizer_root / "tokenizer"
    assert (folder / "vocab.json").stat().st_size == assets.CLIP_VOCAB_BYTES
    assert (folder / "merges.txt").stat().st_size == assets.CLIP_MERGES_BYTES
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert (vocab["!"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 49406, 49407)
    for name, sizes in (("tokenizer", (588, 705)), ("tokenizer_2", (576, 856))):  # the hub's listing
        got = tuple(
            (tokenizer_root / name / f).stat().st_size for f in ("special_tokens_map.json", "tokenizer_config.json")
        )
        assert got == sizes


def test_t5_asset_has_t5_special_ids(tokenizer_root):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_root / "tokenizer_3" / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.get_piece_size() == assets.T5_TINY_VOCAB


# ---------------------------------------------------------------------------------------------
# CLIP


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_clip_ids_match_transformers(tokenizer_root, folder):
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_root / folder)
    ours = CLIPTokenizer.from_folder(tokenizer_root / folder)
    prompts = PROMPTS + _random_prompts(300)
    batch = ours.tokenize(prompts)
    assert batch.ids.dtype == np.int32 and batch.ids.shape == (len(prompts), 77)
    np.testing.assert_array_equal(batch.ids, _hf_fixed(ref, prompts, 77))
    assert ours.pad_id == ref.pad_token_id == (49407 if folder == "tokenizer" else 0)
    assert (ours.bos_id, ours.eos_id) == (49406, 49407)


@pytest.mark.parametrize("folder", ["tokenizer", "tokenizer_2"])
def test_clip_truncation_is_reported_like_diffusers(tokenizer_root, folder):
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_root / folder)
    ours = CLIPTokenizer.from_folder(tokenizer_root / folder)
    batch = ours.tokenize(PROMPTS)
    for i, full in enumerate(_hf_untruncated(ref, PROMPTS)):
        assert batch.dropped[i] == max(0, len(full) - 77)
        assert batch.lengths[i] == min(len(full), 77)
        if batch.dropped[i]:
            # diffusers: tokenizer.batch_decode(untruncated_ids[:, 77 - 1 : -1])
            assert batch.dropped_text[i] == ref.decode(full[76:-1])
    assert sum(d > 0 for d in batch.dropped) == 3
    warnings = batch.truncation_warnings("CLIP-L")
    assert len(warnings) == 3 and "tokens dropped" in warnings[0]


def test_clip_g_bang_trap(tokenizer_root):
    """tokenizer_2 declares `!` (id 0) special: runs of `!` become one 0 per `!`, unlike tokenizer/."""
    clip_l = CLIPTokenizer.from_folder(tokenizer_root / "tokenizer")
    clip_g = CLIPTokenizer.from_folder(tokenizer_root / "tokenizer_2")
    prompt = "! !! !!!"
    assert list(clip_g.tokenize(prompt).ids[0, :8]) == [49406, 0, 0, 0, 0, 0, 0, 49407]  # diffusers issue #4153
    ref_l = transformers.CLIPTokenizer.from_pretrained(tokenizer_root / "tokenizer")
    assert clip_l.tokenize(prompt).ids[0].tolist() == _hf_fixed(ref_l, [prompt], 77)[0].tolist()
    assert clip_l.encode(prompt) != clip_g.encode(prompt)


def test_clip_from_files(tokenizer_root):
    vocab, merges = tokenizer_root / "tokenizer" / "vocab.json", tokenizer_root / "tokenizer" / "merges.txt"
    prompts = PROMPTS + _random_prompts(100, seed=1)
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"), ("tokenizer_2", 0)):
        ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_root / folder)
        ours = CLIPTokenizer.from_files(vocab, merges, pad_token=pad)
        np.testing.assert_array_equal(ours.tokenize(prompts).ids, _hf_fixed(ref, prompts, 77))
    # open_clip / SAI tokenization of CLIP-G: pad with 0, but `!` tokenized as ordinary text
    sai = CLIPTokenizer.from_files(vocab, merges, pad_token=0, pad_is_special=False)
    ref_l = _hf_fixed(transformers.CLIPTokenizer.from_pretrained(tokenizer_root / "tokenizer"), prompts, 77)
    ours = sai.tokenize(prompts)
    expected = np.where(np.arange(77)[None, :] < ours.lengths[:, None], ref_l, 0)
    np.testing.assert_array_equal(ours.ids, expected)


def test_clip_folder_without_added_tokens_decoder(tokenizer_root, tmp_path):
    """Older configs name the pad token only in special_tokens_map.json; transformers still makes it special."""
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_root / "tokenizer_2" / f, folder / f)
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "!",
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_folder(folder)
    np.testing.assert_array_equal(ours.tokenize(PROMPTS).ids, _hf_fixed(ref, PROMPTS, 77))
    assert ours.pad_id == 0


def test_folders_saved_by_transformers(tokenizer_root, tmp_path):
    """transformers 5 re-saves tokenizers as tokenizer.json only (no vocab.json / spiece.model)."""
    prompts = PROMPTS + _random_prompts(100, seed=2)
    for folder in ("tokenizer", "tokenizer_2"):
        transformers.CLIPTokenizer.from_pretrained(tokenizer_root / folder).save_pretrained(tmp_path / folder)
        ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / folder)
        ours = CLIPTokenizer.from_folder(tmp_path / folder)
        np.testing.assert_array_equal(ours.tokenize(prompts).ids, _hf_fixed(ref, prompts, 77))
    transformers.T5Tokenizer.from_pretrained(tokenizer_root / "tokenizer_3").save_pretrained(tmp_path / "tokenizer_3")
    saved = tmp_path / "tokenizer_3"
    ref = transformers.T5Tokenizer.from_pretrained(saved)
    ours = T5Tokenizer.from_folder(saved, max_length=128)
    np.testing.assert_array_equal(ours.tokenize(prompts).ids, _hf_fixed(ref, prompts, 128))


def test_missing_files_raise(tmp_path):
    with pytest.raises(InputError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(InputError, match="spiece.model"):
        T5Tokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# T5


def _t5_references(folder: Path):
    refs = [transformers.T5Tokenizer.from_pretrained(folder)]
    if hasattr(transformers, "T5TokenizerFast"):  # diffusers' tokenizer_3 class
        refs.append(transformers.T5TokenizerFast.from_pretrained(folder))
    return refs


@pytest.mark.parametrize("max_length", [77, 256, 512])
def test_t5_ids_match_transformers(tokenizer_root, max_length):
    folder = tokenizer_root / "tokenizer_3"
    ours = T5Tokenizer.from_folder(folder, max_length=max_length)
    prompts = PROMPTS + _random_prompts(300, seed=3)
    batch = ours.tokenize(prompts)
    assert batch.ids.dtype == np.int32 and batch.ids.shape == (len(prompts), max_length)
    for ref in _t5_references(folder):
        np.testing.assert_array_equal(batch.ids, _hf_fixed(ref, prompts, max_length))
    # the same file through from_file (no configs: T5 defaults)
    direct = T5Tokenizer.from_file(folder / "spiece.model", max_length)
    np.testing.assert_array_equal(direct.tokenize(prompts).ids, batch.ids)


def test_t5_special_ids_and_truncation(tokenizer_root):
    folder = tokenizer_root / "tokenizer_3"
    ref = transformers.T5Tokenizer.from_pretrained(folder)
    ours = T5Tokenizer.from_folder(folder)  # default length: diffusers' 256
    assert (ours.max_length, ours.eos_id, ours.pad_id) == (256, ref.eos_token_id, ref.pad_token_id) == (256, 1, 0)
    for i in (0, 1, 99):
        assert ours.special_ids[f"<extra_id_{i}>"] == ref.convert_tokens_to_ids(f"<extra_id_{i}>")
    batch = ours.tokenize(PROMPTS, max_length=77)
    for i, full in enumerate(_hf_untruncated(ref, PROMPTS)):
        assert batch.dropped[i] == max(0, len(full) - 77)
        if batch.dropped[i] and "<" not in PROMPTS[i]:
            assert batch.dropped_text[i] == ref.decode(full[76:-1])
    assert any(batch.dropped)
    for bad in (76, 513):
        with pytest.raises(InputError, match="between 77 and 512"):
            ours.tokenize("x", max_length=bad)
        with pytest.raises(InputError):
            T5Tokenizer.from_folder(folder, max_length=bad)
