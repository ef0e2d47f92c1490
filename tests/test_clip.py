"""CLIP text encoder (parity with transformers' CLIPTextModel, key layouts of transformers 4/5 and SD) and the BPE
tokenizer (ids equal transformers' CLIPTokenizer on a vocabulary trained here; the gz merge-list format)."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cq.errors import CheckpointKeyMismatchError, ConfigError, InputShapeError
from cq.models import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, load_weights
from cq.models.convert_ldm import clip_text_state
from cq.models.tokenizer import _pre_tokenize, bytes_to_unicode


# fp32: identical math; transformers runs attention through SDPA with an additive finfo.min causal mask where cq
# multiplies, masks with -inf and normalises (reordered reductions). Measured max |diff| ~1e-6 on O(1) outputs.
PARITY_ATOL = 2e-5

# ecosystem.md §B; bos/eos inside the vocabulary (transformers 5 warns otherwise)
TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


@pytest.fixture(scope="module")
def text_pair():
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as Reference

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = Reference(RefConfig(**TINY, bos_token_id=998, eos_token_id=999, pad_token_id=1)).eval()
    model = CLIPTextModel(CLIPTextConfig(**TINY)).eval()
    load_weights(model, clip_text_state(ref.state_dict()))
    return model, ref


def _ids(batch: int = 3, length: int = 77) -> torch.Tensor:
    ids = torch.randint(0, 998, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 998
    ids[:, 9:] = 999  # end token then eos padding, as SD v1 feeds it
    return ids


def test_text_encoder_parity_with_transformers(text_pair):
    model, ref = text_pair
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        expected = ref(input_ids=ids).last_hidden_state
    assert out.shape == expected.shape == (3, 77, 32)
    assert (out - expected).abs().max() <= PARITY_ATOL
    # causal: a token never sees the ones after it
    changed = ids.clone()
    changed[:, 20] = 5
    with torch.no_grad():
        other = model(changed)
    assert torch.equal(other[:, :20], out[:, :20]) and not torch.allclose(other[:, 20:], out[:, 20:])


@given(length=st.integers(1, 77), data=st.data())
def test_text_encoder_parity_over_lengths(text_pair, length, data):
    model, ref = text_pair
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(0, 1000, (2, length), generator=g)
    with torch.no_grad():
        assert (model(ids) - ref(input_ids=ids).last_hidden_state).abs().max() <= PARITY_ATOL


def test_gelu_variant(text_pair):
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as Reference

    config = {**TINY, "hidden_act": "gelu"}
    ref = Reference(RefConfig(**config, bos_token_id=998, eos_token_id=999, pad_token_id=1)).eval()
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    load_weights(model, clip_text_state(ref.state_dict()))
    with torch.no_grad():
        assert (model(_ids()) - ref(input_ids=_ids()).last_hidden_state).abs().max() <= PARITY_ATOL


@pytest.mark.parametrize(
    "prefix",
    ["", "text_model.", "transformer.text_model.", "cond_stage_model.transformer.text_model."],
    ids=["transformers5", "transformers4", "conditioner", "sd-ckpt"],
)
def test_key_layouts(text_pair, prefix):
    model, ref = text_pair
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(77)[None]  # carried by old files; dropped
    if prefix.startswith("cond_stage_model"):  # a full SD checkpoint: the other parts are ignored
        state["model.diffusion_model.out.2.weight"] = torch.zeros(1)
        state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    fresh = CLIPTextModel(model.config)
    load_weights(fresh, clip_text_state(state))
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_plain_load_of_prefixed_keys_fails_without_conversion(text_pair):
    """transformers 5 flattened the model: SD's text_model.* keys need both prefixes stripped (ecosystem.md §0.7)."""
    model, ref = text_pair
    state = {"text_model." + k: v for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointKeyMismatchError) as info:
        load_weights(CLIPTextModel(model.config), state)
    assert len(info.value.missing) == len(info.value.unexpected) == 36


def test_text_encoder_checks():
    model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in TINY.items()}))
    with pytest.raises(InputShapeError, match="77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(InputShapeError, match="integer"):
        model(torch.zeros(1, 5))
    with pytest.raises(InputShapeError, match="1000"):
        model(torch.full((1, 5), 1000))
    with pytest.raises(ConfigError, match="divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    nested = {"text_config": {"hidden_size": 64, "num_attention_heads": 4, "projection_dim": 5}}
    assert CLIPTextConfig.from_transformers(nested).hidden_size == 64


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

CORPUS = [
    "a photo of a cat",
    "an astronaut riding a horse on the moon, highly detailed",
    "a painting of a fox sitting in a field at sunrise in the style of claude monet",
    "the quick brown fox jumps over the lazy dog's back",
    "portrait photograph of an old man, 85mm, trending on artstation, 4k",
    "café au lait, crème brûlée, naïve résumé",
]

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A Photo   of\ta CAT!!",
    "it's the dog's bone, isn't it? they're here, we've been, I'm ok, you'll see, he'd go",
    "Café naïve résumé — 東京 🚀 ß İstanbul ΣΊΣΥΦΟΣ",
    "e\u0301 (decomposed) vs é",
    "numbers 12345 and ½ ² Ⅻ ٣",
    "hello''s world ’curly’ quotes “double”",
    "tab\ttab\nnewline\u00a0nbsp\u3000ideographic\u2028line",
    "<|startoftext|>already<|endoftext|> special.<|endoftext|>",
    "uppercase <|ENDOFTEXT|> is not special",
    "emoji 👩‍👩‍👧 and flags 🇫🇷 and zwj\u200b",
    " ".join(["word"] * 100),  # truncated at 77
    "x" * 300,
    "a " * 75 + "cat",  # exactly at the limit: 75 tokens + start + end
]


def _train_merges(corpus: list[str], num: int) -> list[tuple[str, str]]:
    """A minimal BPE trainer (most frequent pair first) over CLIP's pre-tokenized, byte-mapped corpus."""
    table = bytes_to_unicode()
    words: collections.Counter = collections.Counter()
    for text in corpus:
        for piece in _pre_tokenize(CLIPTokenizer.clean(text)):
            symbols = [table[b] for b in piece.encode("utf-8")]
            words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
    merges = []
    for _ in range(num):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    merges = _train_merges(CORPUS, 300)
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps(CLIPTokenizer.vocab_from_merges(merges)), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, merges


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_files):
    from transformers import CLIPTokenizer as Reference

    return Reference.from_pretrained(str(tokenizer_files[0]))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_files) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(tokenizer_files[0])


def _reference_ids(reference, text: str) -> list[int]:
    return reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_ids_equal_transformers(tokenizer, reference_tokenizer, prompt):
    ids = tokenizer([prompt])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == _reference_ids(reference_tokenizer, prompt)


def test_tokenizer_batches_truncates_and_pads(tokenizer, reference_tokenizer):
    ids = tokenizer(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    assert (ids[:, 0] == bos).all()
    assert ids[1].tolist() == [bos] + [eos] * 76  # the empty prompt (SD's unconditional branch)
    long = ids[PROMPTS.index(" ".join(["word"] * 100))]
    assert long[-1] == eos and (long[1:-1] != eos).all()  # 75 prompt tokens kept
    assert tokenizer("a photo")[0].tolist() == tokenizer(["a photo"])[0].tolist()
    sd2 = CLIPTokenizer(tokenizer.vocab, list(tokenizer.ranks), pad_id=0)  # SD 2 / OpenCLIP pad with 0
    assert sd2("a")[0, 3:].eq(0).all() and sd2("a")[0, 2] == eos


_ALPHABET = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-_()[]<>|\t\n")
    + [
        "é",
        "e\u0301",
        "ß",
        "İ",
        "Σ",
        "東",
        "🚀",
        "’",
        "\u00a0",
        "½",
        "'s",
        "'ll",
        "<|endoftext|>",
        "<|ENDOFTEXT|>",
        "<|startoftext|>",
        "cat",
        "photo",
    ]
)


# Any assigned code point (the Unicode tables of Python's unicodedata and of the tokenizers library differ in version:
# a character new in one of them is a letter there and unassigned in the other).
_TEXT = st.one_of(
    st.lists(_ALPHABET, max_size=40).map("".join),
    st.text(st.characters(exclude_categories=["Cn", "Cs"]), max_size=40),
)


@given(_TEXT)
def test_tokenizer_matches_transformers_on_random_text(tokenizer, reference_tokenizer, text):
    assert tokenizer([text])[0].tolist() == _reference_ids(reference_tokenizer, text)


def test_gz_merge_list(tmp_path, tokenizer_files, tokenizer):
    """open_clip/OpenAI's bpe_simple_vocab_16e6.txt.gz: a header line, then merges; the vocab is derived."""
    _, merges = tokenizer_files
    path = tmp_path / "bpe_simple_vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(" ".join(m) for m in merges) + "\n")
    from_gz = CLIPTokenizer.from_bpe_gz(path, num_merges=None)
    assert from_gz.vocab == tokenizer.vocab
    assert from_gz(PROMPTS).tolist() == tokenizer(PROMPTS).tolist()
    fewer = CLIPTokenizer.from_bpe_gz(path, num_merges=10)
    assert len(fewer.vocab) == 512 + 10 + 2
    assert fewer.encode("photo") != tokenizer.encode("photo")


def test_vocab_layout():
    """CLIP's derivation: 256 byte symbols, the same with </w>, one token per merge, then the two specials."""
    vocab = CLIPTokenizer.vocab_from_merges([("a", "b"), ("ab", "c</w>")])
    assert len(vocab) == 512 + 2 + 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["ab"] == 512 and vocab["abc</w>"] == 513
    assert vocab["<|startoftext|>"] == 514 and vocab["<|endoftext|>"] == 515
    # with the real 48894 merges this puts the specials at 49406 / 49407
    assert 512 + 48894 == 49406


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="startoftext"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ConfigError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    vocab = CLIPTokenizer.vocab_from_merges([])
    with pytest.raises(ConfigError, match="max_length"):
        CLIPTokenizer(vocab, [], max_length=1)


@pytest.fixture(scope="module")
def transformers5_folder(tokenizer_files, reference_tokenizer, tmp_path_factory):
    """What transformers 5 writes for a CLIP tokenizer: tokenizer.json + tokenizer_config.json only."""
    folder = tmp_path_factory.mktemp("clip_tokenizer_json")
    reference_tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists()
    return folder


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_json_folder_gives_the_ids_of_transformers(transformers5_folder, reference_tokenizer, prompt):
    tok = CLIPTokenizer.from_folder(transformers5_folder)
    assert tok([prompt])[0].tolist() == _reference_ids(reference_tokenizer, prompt)


@given(_TEXT)
def test_tokenizer_json_matches_transformers_on_random_text(transformers5_folder, reference_tokenizer, text):
    tok = CLIPTokenizer.from_folder(transformers5_folder)
    assert tok([text])[0].tolist() == _reference_ids(reference_tokenizer, text)


def test_tokenizer_json_and_vocab_files_agree(transformers5_folder, tokenizer):
    tok = CLIPTokenizer.from_folder(transformers5_folder)
    assert tok.vocab == tokenizer.vocab and tok.ranks == tokenizer.ranks and tok.pad_id == tokenizer.pad_id


def test_tokenizer_config_pad_token_is_used(tokenizer_files, tmp_path):
    """SD 2 folders pad with "!" (id 0 in CLIP's vocab) and say so in tokenizer_config.json."""
    folder = tmp_path / "sd2_tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((tokenizer_files[0] / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.pad_id == tok.vocab["!"] != tok.eos_id
    assert CLIPTokenizer.from_folder(folder, pad_id=7).pad_id == 7  # an explicit choice wins


def test_malformed_tokenizer_json_is_a_config_error(tmp_path):
    for text in ("{", json.dumps({"model": {"type": "Unigram", "vocab": []}}), json.dumps({"model": {}})):
        (tmp_path / "tokenizer.json").write_text(text)
        with pytest.raises(ConfigError, match="tokenizer.json"):
            CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no CLIP tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)
