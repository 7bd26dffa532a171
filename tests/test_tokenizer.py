"""ptrain.model.tokenizer: byte-exact against open_clip's SimpleTokenizer, CLIP4Clip truncation.

open_clip is installed --no-deps by `launch/setup.sh --test` (a missing open_clip fails the parity
tests, never skips them) and its package __init__ needs torchvision, so the reference is loaded from
the file open_clip/tokenizer.py alone (it needs only ftfy, regex, numpy and torch).
"""

import importlib.util
import json
import pickle
import random
import string
import subprocess
import sys

import numpy as np
import pytest

from ptrain.model.tokenizer import DEFAULT_VOCAB, ClipTokenizer, _load_clip_gz, get_tokenizer

HARD_TEXTS = [
    "a man is cooking pasta in the kitchen",
    "Café naïve résumé Ångström façade",  # accents
    "東京タワーの夜景 和 北京烤鸭 한국어 텍스트",  # CJK, Hangul
    "🎉🎉 party time 👍🏽!! 👨‍👩‍👧 family",  # emoji, skin tone, ZWJ sequence
    "what?!?!... ---- *** ((nested)) [brackets] {} <>",  # punctuation runs
    "Tom &amp;amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39; &nbsp;",  # (double) html entities
    "Ã©tÃ© mojibake â€œquotedâ€\x9d donâ€™t",  # mojibake that ftfy repairs
    "123,456.78 in 2024 3.14159 1e-4 0x1F",  # numbers: split digit by digit
    "I'm can't we're they've I'll he'd it's I'M CAN'T",  # contractions, both cases
    "",
    "   \t\n  \r\n ",
    "ÀÉÎ İstanbul ß ẞ ΣΊΣΥΦΟΣ Ωmega",  # tricky lower-casing
    "zero\u200bwidth\u00a0nbsp \u3000ideographic space",
    "a\x00b\x07c\x1b[31m control chars",
    "ﬁ ligature ①② ½ ™ ℃",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº–≠",
    "http://example.com/path?q=1&x=2 user@mail.org #hashtag @mention",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "The quick brown fox. " * 40,  # long text
    "x" * 600,  # one very long word
]


OPEN_CLIP_MISSING = (
    "open_clip_torch is not installed, so the tokenizer parity tests cannot run (they must not be skipped: "
    "parity with open_clip is what they prove). Install the test dependencies with `bash launch/setup.sh --test`, "
    "or `python -m pip install --no-deps open_clip_torch`."
)


def _open_clip_reference():
    """open_clip's SimpleTokenizer, loaded from its module file (skips the torchvision-needing
    __init__). A missing open_clip fails the parity tests: launch/setup.sh --test installs it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(OPEN_CLIP_MISSING, pytrace=False)
    path = f"{list(spec.submodule_search_locations)[0]}/tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def ref():
    """The reference tokenizer for the parity tests (only those request it)."""
    return _open_clip_reference()


def test_missing_open_clip_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(pytest.fail.Exception, match=r"pip install --no-deps open_clip_torch") as e:
        _open_clip_reference()
    assert "launch/setup.sh --test" in str(e.value)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.mark.parametrize("text", HARD_TEXTS, ids=lambda t: repr(t[:24]))
def test_encode_matches_open_clip(ref, tok, text):
    assert tok.encode(text) == ref.encode(text)


def test_random_unicode_matches_open_clip(ref, tok):
    """Seeded fuzz over mixed scripts, combining marks, emoji, controls and whitespace."""
    rng = random.Random(0)
    pools = [
        string.ascii_letters + string.digits + string.punctuation + "  ",
        "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœ",
        "\u0301\u0308\u0327\u200d\ufe0f",  # combining marks, ZWJ, variation selector
        "的一是不了人我在有他这为之大来以个中上们日本語カタカナ한국어",
        "😀🎉👍🏽🇫🇷🧑‍🍳❤️",
        "\t\n\r\x0b\x0c\u00a0\u2003\u3000",
        "&amp;&lt;&gt;&quot;&#39;&#x27;",
        "ÃƒÂ©â€™â€œÂ",  # mojibake fragments
        "٠١٢٣ Ⅻ ½ ² ³ ①",  # non-ASCII digits and numerals
    ]
    for _ in range(300):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40)))
        assert tok.encode(text) == ref.encode(text), repr(text)


def test_special_ids_and_vocab_match_open_clip(ref, tok):
    r = ref
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (49406, 49407, 49408)
    assert (r.sot_token_id, r.eot_token_id, r.vocab_size) == (49406, 49407, 49408)
    # Same id for every ordinary token (the special tokens are spelled differently by open_clip).
    ours = {t: i for t, i in tok.encoder.items() if i < 49406}
    theirs = {t: i for t, i in r.encoder.items() if i < 49406}
    assert ours == theirs


def test_known_ids(tok):
    # Stable anchors: CLIP's ids for a plain caption (also what open_clip/OpenAI produce).
    assert tok.encode("a man is cooking") == [320, 786, 533, 6283]
    assert tok.encode("") == [] and tok.encode(" \n\t ") == []


def test_batch_layout_and_truncation_keeps_eot(tok):
    texts = ["a man is cooking", "", "word " * 100]
    ids, mask = tok(texts, max_words=8)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (3, 8)
    body = tok.encode("a man is cooking")
    assert ids[0].tolist() == [49406, *body, 49407, 0, 0]
    assert mask[0].tolist() == [1] * 6 + [0] * 2
    assert ids[1].tolist() == [49406, 49407] + [0] * 6 and mask[1].sum() == 2
    # Long text: SOT + exactly max_words - 2 tokens + EOT, nothing padded.
    assert ids[2].tolist() == [49406, *tok.encode("word " * 100)[:6], 49407]
    assert mask[2].tolist() == [1] * 8
    # Every row has exactly one EOT, at the last masked position (text features are read there).
    for row, m in zip(ids, mask):
        assert (row == 49407).sum() == 1 and row[m.sum() - 1] == 49407


def test_truncation_vs_open_clip_tokenize(ref, tok):
    """open_clip 3.x cuts SOT+tokens+EOT to L and overwrites the last slot with EOT, which gives
    the same ids as our SOT + tokens[:L-2] + EOT for every L. Cutting the full id sequence to L
    (what `ids[:, :L]` on an untruncated batch, or an older/naive tokenize does) loses EOT; ours
    never does, and the text feature is read at EOT."""
    r = ref
    texts = ["word " * 100, "a man is cooking", "x" * 600, ""]
    for L in (2, 3, 8, 32, 77):
        ours, _ = tok(texts, max_words=L)
        theirs = r(texts, context_length=L).numpy()
        assert np.array_equal(ours, theirs), L
    # The naive cut drops EOT; ours keeps it.
    full = r(["word " * 100], context_length=200).numpy()
    sliced = full[:, :32]
    assert 49407 not in sliced[0]
    ours, _ = tok(["word " * 100], max_words=32)
    assert ours[0, -1] == 49407


def test_literal_special_tokens_are_text(ref, tok):
    """Captions are data: a literal special-token spelling never becomes a special id. open_clip
    matches its own spelling ("<start_of_text>") and differs from us there; OpenAI's spelling
    ("<|startoftext|>") is ordinary text to open_clip, so both agree."""
    r = ref
    assert 49406 in r.encode("<start_of_text> hi")
    assert 49406 not in tok.encode("<start_of_text> hi")
    assert tok.encode("<|startoftext|> hi <|endoftext|>") == r.encode("<|startoftext|> hi <|endoftext|>")
    assert not {49406, 49407} & set(tok.encode("<|startoftext|> hi <|endoftext|>"))


def test_decode_roundtrip(tok):
    assert tok.decode(tok.encode("Café naïve, 東京 🎉!")) == "café naïve , 東京 🎉!"
    ids, mask = tok(["a man is cooking"], max_words=10)
    assert tok.decode(ids[0][mask[0] == 1]) == "a man is cooking"


def test_bad_input_errors(tok, tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["ok", None])
    with pytest.raises(ValueError, match="max_words"):
        tok(["ok"], max_words=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipTokenizer(str(tmp_path / "nope.txt.gz"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        ClipTokenizer(str(tmp_path))
    # A single str is a batch of one, not a batch of characters.
    ids, _ = tok("a man is cooking", max_words=8)
    assert ids.shape == (1, 8)


def test_hf_directory_gives_same_ids(tok, tmp_path):
    encoder, merges = _load_clip_gz(DEFAULT_VOCAB)
    (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    hf_dir = ClipTokenizer(str(tmp_path))
    for text in HARD_TEXTS:
        assert hf_dir.encode(text) == tok.encode(text)
    # And transformers' own CLIPTokenizer reads the same directory to the same ids on plain text.
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in ["a man is cooking pasta in the kitchen", "Hello, World! It's 2024.", "naïve café"]:
        assert hf(text)["input_ids"] == [49406, *tok.encode(text), 49407]


def test_pickles_for_loader_workers(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a man is cooking") == tok.encode("a man is cooking")


def test_import_does_not_pull_torch():
    code = "import sys, ptrain.model.tokenizer as t; t.get_tokenizer()(['hi']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
