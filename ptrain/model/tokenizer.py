"""OpenAI CLIP's byte-level BPE tokenizer, byte-exact, with CLIP4Clip's truncation rule.

Usage:
    from ptrain.model.tokenizer import get_tokenizer
    tok = get_tokenizer()                        # the vocabulary shipped inside ptrain/model/
    ids_BL, mask_BL = tok(["a man is cooking"], max_words=32)
    tok.encode("a man is cooking")               # -> [320, 786, 533, 6283] (no SOT/EOT)

The pipeline is OpenAI's (and open_clip's ``SimpleTokenizer``): ftfy fix, html-unescape twice,
whitespace collapse, lower-case, the CLIP regex word split, each word's UTF-8 bytes mapped to
printable unicode, then BPE with ``</w>`` marking the end of a word. Ids are identical to
``open_clip.tokenizer.SimpleTokenizer().encode`` (tests/test_tokenizer.py checks it on hard text).

Differences from the references, on purpose:
- Truncation keeps EOT: a row is SOT + at most ``max_words - 2`` BPE tokens + EOT, zero padded, as
  in CLIP4Clip's dataloaders. open_clip's ``tokenize`` reaches the same ids by overwriting the last
  kept token with EOT; simply cutting SOT + tokens + EOT to the length would drop EOT, and OpenAI's
  ``clip.tokenize(truncate=False)`` raises. Text features are read at EOT, so it is always present.
- Text is data: a literal ``<|startoftext|>`` / ``<start_of_text>`` inside a caption is tokenized
  as ordinary characters, never turned into a special id (OpenAI and open_clip would match their
  own spelling of it, and disagree with each other).

Also accepts a Hugging Face CLIP tokenizer directory (``vocab.json`` + ``merges.txt``) as
``vocab_path``. Never touches the network. No torch import: this runs in data-loader workers.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import numbers
import os

import ftfy
import numpy as np
import regex

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

# The CLIP vocabulary uses the first 49152 - 256 - 2 merges of the file (256 byte tokens and the
# two special tokens complete the 49408 entries); the rest of the file is unused.
_NUM_MERGES = 49152 - 256 - 2

# CLIP's word split without the special-token alternatives (see "Text is data" above).
# IGNORECASE is kept as in the reference although text is lower-cased before the split.
_WORD_RE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> tuple[list[str], dict[int, str]]:
    """The 256 printable stand-ins for bytes (GPT-2/CLIP's table): (vocabulary order, byte -> char).

    Printable latin-1 bytes map to themselves; the rest (controls, space, ...) map to 256+n so BPE
    never sees whitespace or control characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + n
            n += 1
    # Dict order (printable first, then the others) defines the first 256 vocabulary ids.
    order = printable + [b for b in range(256) if b not in set(printable)]
    return [chr(table[b]) for b in order], {b: chr(table[b]) for b in range(256)}


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, html-unescape twice, collapse whitespace, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _load_clip_gz(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``."""
    with gzip.open(path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    # Line 0 is a version header; the vocabulary is built from the merges, as in OpenAI's code.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{path} is not a CLIP BPE merges file: expected {_NUM_MERGES} merge lines of two symbols "
            f"after the header. Pass the bpe_simple_vocab_16e6.txt.gz shipped with ptrain or CLIP."
        )
    byte_symbols, _ = _bytes_to_unicode()
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(vocab)}, merges


def _load_hf_dir(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a Hugging Face CLIP tokenizer directory."""
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    bad = [m for m in merges if len(m) != 2]
    missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in encoder]
    if bad or missing or not isinstance(encoder, dict):
        raise ValueError(
            f"{path} is not a CLIP tokenizer directory: merges.txt must hold 'a b' pairs and vocab.json "
            f"must map tokens (including {SOT_TOKEN} and {EOT_TOKEN}) to ids. Missing: {missing}."
        )
    unknown = [m for m in merges if "".join(m) not in encoder]
    if unknown:
        raise ValueError(f"{path}: merges.txt has {len(unknown)} merges absent from vocab.json, e.g. {unknown[0]}.")
    return encoder, merges


class ClipTokenizer:
    """CLIP BPE tokenizer. ``vocab_path``: None (the shipped vocabulary), a ``.txt.gz`` merges file,
    or a Hugging Face tokenizer directory holding ``vocab.json`` and ``merges.txt``."""

    sot_token_id = 49406
    eot_token_id = 49407
    vocab_size = 49408

    def __init__(self, vocab_path: str | None = None):
        path = DEFAULT_VOCAB if vocab_path is None else os.fspath(vocab_path)
        if os.path.isdir(path):
            if not all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
                raise FileNotFoundError(
                    f"tokenizer directory {path} lacks vocab.json and/or merges.txt; pass a Hugging Face CLIP "
                    f"model directory or the path of bpe_simple_vocab_16e6.txt.gz."
                )
            encoder, merges = _load_hf_dir(path)
        elif os.path.isfile(path):
            encoder, merges = _load_clip_gz(path)
        else:
            raise FileNotFoundError(
                f"tokenizer vocabulary {path} does not exist; pass None for the shipped CLIP vocabulary, a "
                f"bpe_simple_vocab_16e6.txt.gz file, or a Hugging Face CLIP directory (vocab.json + merges.txt)."
            )
        self.vocab_path = vocab_path
        self.encoder: dict[str, int] = encoder
        self.decoder: dict[int, str] = {i: t for t, i in encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        # Instance values shadow the class constants (identical for CLIP; read from a HF vocab.json).
        self.sot_token_id = encoder[SOT_TOKEN]
        self.eot_token_id = encoder[EOT_TOKEN]
        self.vocab_size = len(encoder)
        _, byte_map = _bytes_to_unicode()
        # UTF-8 bytes -> stand-in chars in one C call: decode as latin-1, then translate code points.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_map.items()})
        self._byte_decoder = {c: b for b, c in byte_map.items()}
        # Words repeat a lot (captions are short and similar): memoise word -> ids.
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._bpe_ids)

    def __reduce__(self):
        # The lru_cache wrapper does not pickle; rebuild from the path (spawned loader workers).
        return (type(self), (self.vocab_path,))

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """BPE of one pre-split word (already in byte stand-in chars) -> vocabulary ids."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            # Merge the adjacent pair with the lowest merge rank, everywhere it occurs, left to right.
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self.encoder[s] for s in symbols)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of ``text`` without SOT/EOT; stops early once ``max_tokens`` ids are produced."""
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer.encode expects a str, got {type(text).__name__}.")
        ids: list[int] = []
        for word in _WORD_RE.findall(clean_text(text)):
            ids.extend(self._word_ids(word.encode("utf-8").decode("latin-1").translate(self._byte_table)))
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids[:max_tokens]
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids`` (SOT/EOT dropped, ``</w>`` -> space); invalid UTF-8 becomes U+FFFD."""
        special = {self.sot_token_id, self.eot_token_id}
        raw = bytearray()
        for i in ids:
            if int(i) in special:
                continue
            token = self.decoder[int(i)]
            word_end = token.endswith("</w>")
            raw += bytes(self._byte_decoder[c] for c in (token[:-4] if word_end else token))
            if word_end:
                raw += b" "
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: list[str], max_words: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Batch encode: ids int64 [B, max_words] = SOT + tokens[:max_words-2] + EOT, zero padded;
        mask int64 [B, max_words], 1 on SOT..EOT. A single str is treated as a batch of one."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(max_words, bool) or not isinstance(max_words, numbers.Integral) or max_words < 2:
            raise ValueError(f"max_words must be an int >= 2 (room for SOT and EOT), got {max_words!r}.")
        max_words = int(max_words)
        ids_BL = np.zeros((len(texts), max_words), dtype=np.int64)
        mask_BL = np.zeros((len(texts), max_words), dtype=np.int64)
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{b}] is a {type(text).__name__}, expected str; pass a list of captions.")
            row = [self.sot_token_id, *self.encode(text, max_tokens=max_words - 2), self.eot_token_id]
            ids_BL[b, : len(row)] = row
            mask_BL[b, : len(row)] = 1
        return ids_BL, mask_BL


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_path: str | None = None) -> ClipTokenizer:
    """The shared tokenizer of a vocabulary (None: the shipped one); loading a vocabulary takes ~0.2 s, so
    each is loaded once per process."""
    return ClipTokenizer(vocab_path)
