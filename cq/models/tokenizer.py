r"""The CLIP BPE tokenizer (SD v1's text tokenizer), written from the algorithm of OpenAI CLIP ``simple_tokenizer``
and transformers' ``CLIPTokenizer``; no dependency beyond the standard library.

Pipeline for one prompt:

1. cut out the special tokens ``<|startoftext|>`` / ``<|endoftext|>`` written in the prompt (exact match, as
   transformers' added tokens; anything else spelling them, e.g. in upper case, is ordinary text);
2. clean: Unicode NFC, every run of whitespace -> one space, lowercase character by character (transformers'
   normaliser; Python's ``str.lower`` would turn a word-final Σ into ς, the tokenizers library does not);
3. split into pieces: the contractions ``'s 't 're 've 'm 'll 'd``, runs of letters, single digits, runs of other
   non-space characters (CLIP's regex ``<\|startoftext\|>|<\|endoftext\|>|'s|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+``,
   evaluated with ``unicodedata`` categories instead of the ``regex`` package); a special token's spelling left
   after step 1 is one regex piece that transformers' byte-level pre-tokenizer splits again into
   ``<|``, the name, ``|>``;
4. map each piece's UTF-8 bytes to printable characters (GPT-2's byte-to-unicode table), mark the last with ``</w>``
   and apply the BPE merges by rank;
5. ``[<|startoftext|>] + ids[:max_length-2] + [<|endoftext|>]``, padded to ``max_length`` (77) with the pad id --
   ``<|endoftext|>`` for SD v1 (transformers ``pad_token="<|endoftext|>"``); SD 2 / OpenCLIP pad with 0.

Not done: OpenAI's original also runs ``ftfy.fix_text`` and ``html.unescape``. ftfy repairs mojibake ("schÃ¶n" ->
"schön"), uncurls quotes (’ -> '), expands ligatures (ﬁ -> fi), narrows full-width characters (Ａ -> A) and drops
control characters; ``html.unescape`` turns "&amp;" into "&". transformers' tokenizer does neither, and cq matches
transformers: prompts with such text get other ids than with the original CLIP code. Letters and digits are told
apart with Python's ``unicodedata`` tables; a code point assigned in a newer Unicode version than Python's can
split differently than in the tokenizers library.

Files: ``vocab.json`` + ``merges.txt`` (a diffusers/transformers ``tokenizer/`` folder), or the gzipped BPE list
``bpe_simple_vocab_16e6.txt.gz`` of OpenAI CLIP / open_clip (one header line, then merges; the vocabulary is derived:
256 byte symbols, the same with ``</w>``, one token per merge, then the two specials -- 49408 for the real file).
"""

from __future__ import annotations

import copy
import gzip
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError


__all__ = ["CLIPTokenizer", "bytes_to_unicode"]

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
# whitespace as the normaliser's Unicode White_Space class: Python's str.isspace minus the four separators \x1c-\x1f
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
CLIP_NUM_MERGES = 49152 - 256 - 2  # merges of bpe_simple_vocab_16e6 that CLIP uses (48894)
_SPECIALS = re.compile(f"({re.escape(SOT)}|{re.escape(EOT)})")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to themselves, the other
    68 to ``chr(256 + n)`` in byte order (so no byte becomes whitespace or a control character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes, then the others) is CLIP's vocabulary order


def _category(ch: str) -> str:
    cat = unicodedata.category(ch)[0]
    if cat in ("L", "N"):
        return cat
    return " " if ch.isspace() and ch not in "\x1c\x1d\x1e\x1f" else "P"


def _pre_tokenize(text: str) -> list[str]:
    """CLIP's regex split of a cleaned, lowercased segment (alternatives tried in the regex's order)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        special = next((sp for sp in (SOT, EOT) if text.startswith(sp, i)), None)
        if special is not None:  # one piece of the regex, split again by the byte-level pre-tokenizer
            pieces += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        if text[i] == "'" and (c := next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)):
            pieces.append("'" + c)
            i += 1 + len(c)
            continue
        kind = _category(text[i])
        if kind == " ":
            i += 1
            continue
        j = i + 1
        if kind in ("L", "P"):
            while j < n and _category(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])  # a run of letters, one digit, or a run of other characters
        i = j
    return pieces


class CLIPTokenizer:
    """Prompts -> ``[B, max_length]`` token ids as SD v1 feeds them to its text encoder.

    Args:
        vocab: token -> id (``vocab.json``).
        merges: BPE merges in rank order, as ``(left, right)`` pairs.
        max_length: context length (77 for CLIP); longer prompts are truncated.
        pad_token: token that fills the tail (``<|endoftext|>`` for SD v1); ``pad_id`` overrides it (0 for SD 2).

    Example:
        >>> tok = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")
        >>> ids = tok(["a photo of a cat", ""])  # [2, 77], ids[0, :7] = 49406 320 1125 539 320 2368 49407
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        pad_token: str = EOT,
        pad_id: int | None = None,
    ):
        for special in (SOT, EOT):
            if special not in vocab:
                raise ConfigError(f"the vocabulary has no {special!r} token; is this a CLIP vocab.json?")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (start and end tokens), got {max_length}")
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.max_length = max_length
        self.bos_id, self.eos_id = self.vocab[SOT], self.vocab[EOT]
        if pad_id is None:
            if pad_token not in self.vocab:
                raise ConfigError(f"pad_token {pad_token!r} is not in the vocabulary")
            pad_id = self.vocab[pad_token]
        self.pad_id = pad_id
        self._byte_char = bytes_to_unicode()
        self._cache: dict[str, list[str]] = {}

    def with_pad_id(self, pad_id: int) -> CLIPTokenizer:
        """The same tokenizer padding with ``pad_id`` (OpenCLIP towers -- SD 2, SDXL's second encoder -- were
        trained with 0, ``"!"``)."""
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ConfigError(f"pad_id must be an int >= 0, got {pad_id!r}")
        twin = copy.copy(self)
        twin.pad_id = pad_id
        return twin

    # ------------------------------------------------------------------------------------------------------------
    # Construction from files

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> CLIPTokenizer:
        """From ``vocab.json`` and ``merges.txt`` (``#version`` header lines are skipped)."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kwargs) -> CLIPTokenizer:
        """From a Hugging Face ``tokenizer.json`` (the only file transformers 5 writes for a fast tokenizer): its
        BPE ``model.vocab`` and ``model.merges`` (``"a b"`` strings or ``["a", "b"]`` pairs)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            model = data["model"]
            if model.get("type") != "BPE":
                raise ValueError(f"model type {model.get('type')!r}, not BPE")
            vocab = {str(k): int(v) for k, v in model["vocab"].items()}
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path} is not a CLIP BPE tokenizer.json ({type(e).__name__}: {e})") from None
        if any(len(m) != 2 for m in merges):
            raise ConfigError(f"{path}: every merge must be a pair of symbols")
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> CLIPTokenizer:
        """From a tokenizer folder (or a pipeline folder's ``tokenizer/``): ``vocab.json`` + ``merges.txt``, else
        ``tokenizer.json``. The pad token of its ``tokenizer_config.json`` is used unless ``pad_token`` /
        ``pad_id`` is given (SD 2 folders pad with ``"!"``, id 0)."""
        folder = Path(folder)
        if not cls.in_folder(folder) and cls.in_folder(folder / "tokenizer"):
            folder = folder / "tokenizer"
        if not cls.in_folder(folder):
            raise ConfigError(f"{folder} holds no CLIP tokenizer: expected vocab.json + merges.txt, or tokenizer.json")
        if "pad_token" not in kwargs and "pad_id" not in kwargs and (folder / "tokenizer_config.json").exists():
            try:
                pad = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("pad_token")
            except (OSError, json.JSONDecodeError, AttributeError) as e:
                raise ConfigError(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e})") from None
            pad = pad.get("content") if isinstance(pad, dict) else pad  # transformers 4 wrote AddedToken dicts
            if isinstance(pad, str):
                kwargs["pad_token"] = pad
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt", **kwargs)
        return cls.from_tokenizer_json(folder / "tokenizer.json", **kwargs)

    @staticmethod
    def in_folder(folder: Path) -> bool:
        """Whether ``folder`` holds a tokenizer `from_folder` reads."""
        return ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()) or (
            folder / "tokenizer.json"
        ).exists()

    @classmethod
    def from_bpe_gz(cls, path: str | Path, *, num_merges: int | None = CLIP_NUM_MERGES, **kwargs) -> CLIPTokenizer:
        """From a gzipped BPE merge list (``bpe_simple_vocab_16e6.txt.gz``): the first line is a header, then one
        merge per line; CLIP uses the first ``49152 - 256 - 2`` merges (fewer if the file has fewer)."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:]
        lines = [line for line in lines if line.strip()]
        merges = [tuple(line.split()) for line in lines[:num_merges]]
        return cls(cls.vocab_from_merges(merges), merges, **kwargs)

    @staticmethod
    def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
        """CLIP's vocabulary for a merge list: byte symbols, the same with ``</w>``, merged tokens, specials."""
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        return {t: i for i, t in enumerate(tokens)}

    # ------------------------------------------------------------------------------------------------------------
    # Encoding

    @staticmethod
    def clean(text: str) -> str:
        """NFC, whitespace runs -> one space, lowercase each character (edge spaces vanish in the split)."""
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(ch.lower() for ch in text)

    def _bpe(self, piece: str) -> list[str]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = [self._byte_char[b] for b in piece.encode("utf-8")]
        word = symbols[:-1] + [symbols[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[k], word[k + 1]) for k in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, k = [], 0
            while k < len(word):
                if k < len(word) - 1 and (word[k], word[k + 1]) == best:
                    merged.append(word[k] + word[k + 1])
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        if len(self._cache) < 100_000:
            self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, padding or truncation (unknown symbols -> end id).

        ``<|startoftext|>`` / ``<|endoftext|>`` written in the prompt are the special tokens (matched exactly,
        before cleaning, as transformers' added tokens are); the rest is cleaned and split segment by segment.
        """
        ids = []
        for segment in _SPECIALS.split(text):
            if segment in (SOT, EOT):
                ids.append(self.vocab[segment])
                continue
            for piece in _pre_tokenize(self.clean(segment)):
                ids.extend(self.vocab.get(token, self.eos_id) for token in self._bpe(piece))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """``[B, max_length]`` ids: start, at most ``max_length - 2`` prompt tokens, end, padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)
