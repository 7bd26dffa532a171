"""Exports load in the Hugging Face ecosystem: CLIPModel, CLIPTokenizer (ids equal to ptrain's) and CLIPProcessor
(the export's frame size, CLIP mean/std); the README.md model card's code runs; old exports without these files
still load; re-saving never writes through a symlink planted in the export."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ptrain
from ptrain.model import ModelConfig, build_model, save_export
from ptrain.model.hub import CARD_PATH, HF_FILES
from ptrain.model.tokenizer import clean_text, get_tokenizer

T, S, L = 4, 32, 32

# Text that ftfy and html-unescaping leave alone: Hugging Face's CLIP tokenizer must give ptrain's ids as they are.
PLAIN = [
    "a man is cooking",
    "Café naïve résumé Ångström São Paulo Łódź",
    "cafe\u0301 with a combining accent",  # decomposed: both compose it (NFC)
    "İstanbul straße ÉCOLE Ελληνικά σίσυφος.",
    "🎉🎉 party 👍🏽 family 👨‍👩‍👧 ❤️ 🇫🇷 flag",
    "Hello,world!!! ... ?! (yes) [no] {maybe} -- 'quoted' \"double\" it's we'll I'M you'd",
    "東京タワー 서울 Москва 北京 ひらがな",
    "3.14159 and 1,000,000 at 12:30pm #hashtag @user 50% $5",
    "  tabs\tand\nnew lines   and   spaces  ",
    " ".join(f"word{i} and another long phrase" for i in range(60)),  # long: cut at max_words
]
# Text that ptrain's clean_text changes and Hugging Face's normaliser does not: ftfy / html-unescaping (curly quotes,
# entities, mojibake, ligatures, full width) and Python's lower() (a word-final capital sigma becomes final ς, the
# tokenizers library's lowercase gives σ). With clean_text applied first the ids are equal again.
REPAIRED = ["“curly” ‘quotes’", "fish &amp; chips &lt;3 &quot;yum&quot;", "mojibake cafÃ©", "ﬁne ligature",
            "ＦＵＬＬ width", "ΟΔΥΣΣΕΥΣ returns"]
# ptrain reads a caption that spells a special token as text; Hugging Face (like OpenAI) makes it the special id.
SPECIAL = "a <|endoftext|> inside a caption"


def _model(head="meanP", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_model(ModelConfig(clip="tiny", head=head, num_frames=T, frame_size=S, max_words=L,
                                       cross_layers=2, **kw)).eval()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, object]:
    model = _model()
    results = {"protocol": "single", "benchmark": "msrvtt", "all": {"t2v_R1": 12.5, "t2v_R5": 40.0, "t2v_R10": 55.0,
                                                                    "t2v_MdR": 8.0, "t2v_MnR": 12.25, "n_text": 8,
                                                                    "n_video": 8}}
    out = save_export(model, tmp_path_factory.mktemp("hf") / "export",
                      info={"run_dir": "runs/demo", "step": 60, "data sources": ["shards/a", "shards/b"]},
                      results=results)
    return out, model


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


def test_export_carries_the_hf_files(export):
    out, _ = export
    for name in HF_FILES:
        assert (out / name).is_file(), name
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 49152 - 256 - 2
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == L
    for name in HF_FILES:  # plain data only: nothing that would make transformers import code
        assert "auto_map" not in (out / name).read_text(encoding="utf-8")


def test_clip_tokenizer_gives_ptrain_ids(export):
    from transformers import AutoTokenizer, CLIPTokenizer

    out, model = export
    hf = _quiet(CLIPTokenizer.from_pretrained, out)
    assert len(hf) == 49408 and isinstance(_quiet(AutoTokenizer.from_pretrained, out), CLIPTokenizer)
    ids, mask = model.tokenize(PLAIN)
    enc = hf(PLAIN, padding="max_length", truncation=True)  # model_max_length = the export's max_words
    got_ids, got_mask = torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"])
    assert got_ids.shape == ids.shape == (len(PLAIN), L)
    assert torch.equal(got_mask, mask)
    # the one convention that differs: padding (HF pads with EOT, ptrain with 0); the masks above agree
    assert torch.equal(got_ids * got_mask, ids)
    assert bool((got_ids[mask == 0] == 49407).all()) and bool((ids[mask == 0] == 0).all())
    assert int(mask[-1].sum()) == L  # the long caption was cut, and both keep EOT last
    assert int(ids[-1, -1]) == int(got_ids[-1, -1]) == 49407
    # without truncation the whole token lists agree as well
    tok = get_tokenizer()
    for text in PLAIN:
        assert _quiet(hf, text)["input_ids"] == [49406, *tok.encode(text), 49407], text


def test_clip_tokenizer_after_ptrain_cleaning(export):
    from transformers import CLIPTokenizer

    out, model = export
    hf = _quiet(CLIPTokenizer.from_pretrained, out)
    ids, mask = model.tokenize(REPAIRED)
    raw = torch.tensor(hf(REPAIRED, padding="max_length", truncation=True)["input_ids"])
    cleaned = hf([clean_text(t) for t in REPAIRED], padding="max_length", truncation=True)
    assert torch.equal(torch.tensor(cleaned["input_ids"]) * torch.tensor(cleaned["attention_mask"]), ids)
    for row in range(len(REPAIRED)):  # each of these is a real difference, as the model card says
        assert not torch.equal(raw[row] * mask[row], ids[row]), REPAIRED[row]
    special = hf(SPECIAL)["input_ids"]
    assert special[:3] == [49406, 320, 49407] and model.tokenize([SPECIAL])[0][0, 2] != 49407


def test_clip_model_and_processor_match_ptrain(export):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    out, model = export
    processor = _quiet(CLIPProcessor.from_pretrained, out)
    hf = _quiet(CLIPModel.from_pretrained, out).eval()
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (T, S, S, 3), dtype=np.uint8)
    texts = ["a man is cooking", "Café 🎉 東京, it's"]
    inputs = processor(text=texts, images=[Image.fromarray(f) for f in frames], return_tensors="pt",
                       padding="max_length", truncation=True)
    assert inputs["pixel_values"].shape == (T, 3, S, S)
    want = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(inputs["pixel_values"], want, atol=1e-5, rtol=0)
    big = processor(images=[Image.fromarray(g.integers(0, 256, (3 * S, 2 * S, 3), dtype=np.uint8))], return_tensors="pt")
    assert big["pixel_values"].shape == (1, 3, S, S)  # short side resized, centre crop: the export's frame size
    frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]
    with torch.no_grad():
        hf_out = hf(**inputs)
        # meanP: the mean of the normalised frame embeddings is the video embedding; scores equal ptrain's
        video = torch.nn.functional.normalize(hf_out.image_embeds.mean(0, keepdim=True), dim=-1)
        hf_scores = hf.logit_scale.exp() * hf_out.text_embeds @ video.T
    ours = model.similarity(model.encode_text(texts), model.encode_video(frames_t))
    torch.testing.assert_close(hf_scores, ours, rtol=1e-4, atol=1e-4)


def _card_code(card: str, heading: str, path: Path) -> str:
    block = re.search(re.escape(heading) + r".*?```python\n(.*?)```", card, re.S)
    assert block, heading
    return block.group(1).replace(CARD_PATH, str(path))


def _run(code: str) -> dict:
    scope: dict = {}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_model_card_says_what_it_is_and_its_code_runs(export, tmp_path):
    out, model = export
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntags:") and "meanP" in card
    assert "| run_dir | runs/demo |" in card and "| data sources | shards/a, shards/b |" in card
    assert "| text -> video | 12.5 | 40 | 55 | 8 | 12.25 |" in card and "benchmark msrvtt" in card
    ptrain_scores = _run(_card_code(card, "## Use with ptrain", out))["scores"]
    hf_scores = _run(_card_code(card, "## Use with transformers", out))["scores"]
    assert ptrain_scores.shape == hf_scores.shape == (1, 1)
    torch.testing.assert_close(hf_scores, ptrain_scores, rtol=1e-4, atol=1e-4)  # meanP: the same score
    # another head: the card says transformers averages frames, and its ptrain code runs the head
    tab = save_export(_model("TAB"), tmp_path / "tab")
    tab_card = (tab / "README.md").read_text()
    assert "TDB+TAB" in tab_card and "NOT the TDB+TAB head" in tab_card and "Not recorded" in tab_card
    assert "No evaluation was recorded" in tab_card
    assert _run(_card_code(tab_card, "## Use with ptrain", tab))["scores"].shape == (1, 1)
    assert _run(_card_code(tab_card, "## Use with transformers", tab))["scores"].shape == (1, 1)


def test_exports_without_the_hf_files_still_load(export, tmp_path):
    import shutil

    out, model = export
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for name in HF_FILES:
        (old / name).unlink()
    loaded = ptrain.load(old)
    assert loaded.cfg == model.cfg and torch.equal(loaded.tokenize(PLAIN)[0], model.tokenize(PLAIN)[0])
    save_export(loaded, old)  # re-saving an old export adds them
    assert all((old / name).is_file() for name in HF_FILES)


def test_resaving_never_writes_through_planted_symlinks(export, tmp_path):
    """An export is untrusted: re-saving a model into it replaces a symlink planted at any name it writes (or at
    the temporary names older ptrain used), never writing the file it points to."""
    import shutil

    out, model = export
    target = tmp_path / "outside.txt"
    target.write_text("TOPSECRET-unchanged")
    there = tmp_path / "planted"
    shutil.copytree(out, there)
    names = [*HF_FILES, "config.json.tmp", "bpe_simple_vocab_16e6.txt.gz.tmp", "vocab.json.tmp", "README.md.tmp"]
    for name in names:
        (there / name).unlink(missing_ok=True)
        (there / name).symlink_to(target)
    save_export(model, there)
    assert target.read_text() == "TOPSECRET-unchanged"
    for name in HF_FILES:
        assert not (there / name).is_symlink() and (there / name).is_file()
    assert ptrain.load(there).cfg == model.cfg
    assert not list(there.glob(".*.tmp"))  # no temporary left behind


def test_convert_writes_a_card_naming_its_source(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from ptrain.config import load_config
    from ptrain.model.clip import named_clip_config
    from ptrain.model.config import ConvertConfig
    from ptrain.model.convert import run

    CLIPModel(named_clip_config("tiny", S)).save_pretrained(tmp_path / "hf_clip")
    cfg = load_config(ConvertConfig, None, [f"src={tmp_path / 'hf_clip'}", "format=clip", "head=meanP",
                                            f"out={tmp_path / 'export'}", "num_frames=4", "max_words=16"])
    with contextlib.redirect_stdout(io.StringIO()):
        assert _quiet(run, cfg) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| source | {tmp_path / 'hf_clip'} |" in card and "freshly initialised head" in card
    hf = _quiet(CLIPTokenizer.from_pretrained, tmp_path / "export")
    assert hf("a dog", padding="max_length", truncation=True)["input_ids"][:4] == [49406, 320, 1929, 49407]
    assert hf.model_max_length == 16


def test_checkpoint_card_reads_the_run_config(tmp_path):
    """A training checkpoint's card: run dir, step, data sources (with their mixing weights) and init, from the
    run's config.yaml; a run directory without one still gets the run dir and step."""
    from ptrain.checkpoint import card_info
    from ptrain.config import dump_config, load_config
    from ptrain.configs import PretrainConfig

    run = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [f"run_dir={run}", "model.clip=ViT-B/32",
                                             "data.sources=[{path: /data/a, weight: 3}, /data/b]", "data.resampled=true"])
    dump_config(cfg, run / "config.yaml")
    info = card_info(run, {"step": 40, "samples_seen": 640})
    assert info["run_dir"] == str(run) and info["step"] == 40 and info["samples seen"] == 640
    assert info["data sources"] == ["/data/a (weight 3.0)", "/data/b"] and info["init"] == "ViT-B/32"
    out = save_export(_model(), tmp_path / "export", info=info)
    assert "| data sources | /data/a (weight 3.0), /data/b |" in (out / "README.md").read_text()
    assert card_info(tmp_path / "elsewhere", {"step": 1}) == {
        "made by": "a ptrain training run (checkpoint export)", "run_dir": str(tmp_path / "elsewhere"), "step": 1}
