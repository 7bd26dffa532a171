"""Export directory: ptrain.load gives identical outputs; the CLIP part loads with transformers."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptrain
from ptrain.model import ModelConfig, build_model, save_export

T, S = 4, 32


def _model(head, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(ModelConfig(clip="tiny", head=head, num_frames=T, frame_size=S, max_words=8, cross_layers=2, **kw))
    with torch.no_grad():  # move heads away from their CLIP-copied init so a wrong key would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, T, 3, S, S), dtype=torch.uint8, generator=g)
    return frames, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    "head,kw",
    [("meanP", {}), ("seqLSTM", {}), ("seqTransf", {"linear_patch": "3d"}), ("tightTransf", {}),
     ("TDB", {"tdb_proj": "sigmoid_mlp"}), ("TAB", {}), ("TAB", {"compat": True, "tab_motion": "TAB", "tab_global": "seqTransf"})],
)
def test_export_then_load_gives_identical_outputs(tmp_path, head, kw):
    model = _model(head, **kw)
    save_export(model, tmp_path / "export")
    loaded = ptrain.load(tmp_path / "export")
    assert loaded.cfg == model.cfg
    frames, mask = _inputs()
    texts = ["a man is cooking", "two dogs play in the snow"]
    for m in (model, loaded):
        m.out = m.similarity(m.encode_text(texts), m.encode_video(frames, mask))
    assert torch.equal(loaded.out, model.out)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_export_is_self_describing_and_hf_loadable(tmp_path):
    from transformers import CLIPModel

    model = _model("TAB")
    out = save_export(model, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "clip"
    section = cfg["ptrain"]
    assert section["model"]["head"] == "TAB" and section["model"]["num_frames"] == T and section["model"]["frame_size"] == S
    assert section["normalization"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert section["tokenizer"]["eot_token_id"] == 49407 and section["ptrain_version"] == ptrain.__version__
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["logit_scale"].dim() == 0 and any(k.startswith("tab.") for k in tensors)

    hf = CLIPModel.from_pretrained(out).eval()
    ids, _ = model.tokenize(["a man is cooking"])
    frames, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf.get_text_features(input_ids=ids).pooler_output, model.text_features(ids)[0])
        pixels = (frames[0].float() / 255 - model.pixel_mean) / model.pixel_std
        torch.testing.assert_close(hf.get_image_features(pixel_values=pixels).pooler_output, model.frame_features(frames[:1])[0])
    assert float(hf.logit_scale.detach().exp()) == pytest.approx(float(model.logit_scale().detach()), rel=1e-6)


def _hf_tokenizer_dir(path):
    """A Hugging Face-layout CLIP tokenizer directory (vocab.json + merges.txt) of the CLIP vocabulary."""
    from ptrain.model.tokenizer import DEFAULT_VOCAB, _load_clip_gz

    encoder, merges = _load_clip_gz(DEFAULT_VOCAB)
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("vocab", ["shipped", "hf_dir"])
def test_export_carries_its_vocabulary_and_can_be_moved(tmp_path, vocab):
    """The export holds its own copy of the vocabulary, named relatively in config.json, so a moved
    export still tokenizes (and the source vocabulary may be gone)."""
    import shutil

    from ptrain.model.tokenizer import DEFAULT_VOCAB

    kw = {"tokenizer": str(_hf_tokenizer_dir(tmp_path / "hf_tok"))} if vocab == "hf_dir" else {}
    model = _model("meanP", **kw)
    texts = ["a man is cooking", "Café naïve 東京 🎉"]
    want = model.tokenize(texts)
    out = save_export(model, tmp_path / "export")
    section = json.loads((out / "config.json").read_text())["ptrain"]
    rel = section["tokenizer"]["vocab"]
    assert not rel.startswith("/") and (out / rel).exists()
    if vocab == "shipped":
        assert rel == "bpe_simple_vocab_16e6.txt.gz" and section["model"]["tokenizer"] == ""
        assert (out / rel).read_bytes() == open(DEFAULT_VOCAB, "rb").read()
    else:
        assert rel == "tokenizer" and section["model"]["tokenizer"] == "tokenizer"
        assert sorted(p.name for p in (out / rel).iterdir()) == ["merges.txt", "vocab.json"]
        shutil.rmtree(tmp_path / "hf_tok")  # the original vocabulary is gone
    moved = tmp_path / "elsewhere" / "my_export"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    loaded = ptrain.load(moved)
    assert loaded.tokenizer_path is not None and loaded.tokenizer_path.startswith(str(moved.resolve()))
    got = loaded.tokenize(texts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if vocab == "shipped":
        assert loaded.cfg == model.cfg
    # Re-exporting a loaded model (into a new directory, or over itself) keeps the vocabulary.
    for again in (tmp_path / "again", moved):
        save_export(loaded, again)
        assert torch.equal(ptrain.load(again).tokenize(texts)[0], want[0])
    # An export whose vocabulary went missing says so.
    if vocab == "shipped":
        (moved / rel).unlink()
    else:
        shutil.rmtree(moved / rel)
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        ptrain.load(moved)


def test_older_exports_still_load(tmp_path):
    """Exports written before the vocabulary copy (repo-relative shipped path) and before raw TDB
    dropped its unused LayerNorm."""
    model = _model("TDB", tdb_proj="raw")
    out = save_export(model, tmp_path / "export")
    (out / "bpe_simple_vocab_16e6.txt.gz").unlink()
    cfg = json.loads((out / "config.json").read_text())
    cfg["ptrain"]["tokenizer"]["vocab"] = "ptrain/model/bpe_simple_vocab_16e6.txt.gz"
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    tensors["head.tdb.trans_layernorm.weight"], tensors["head.tdb.trans_layernorm.bias"] = torch.ones(32), torch.zeros(32)
    save_file(tensors, str(out / "model.safetensors"))
    loaded = ptrain.load(out)
    assert loaded.tokenizer_path is None and torch.equal(loaded.tokenize(["a dog"])[0], model.tokenize(["a dog"])[0])
    frames, mask = _inputs()
    torch.testing.assert_close(loaded.encode_video(frames, mask), model.encode_video(frames, mask))


def test_load_is_strict_and_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a ptrain export"):
        ptrain.load(tmp_path / "nothing")
    out = save_export(_model("seqTransf"), tmp_path / "export")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["head.frame_position_embeddings.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        ptrain.load(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("ptrain")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="plain Hugging Face CLIP"):
        ptrain.load(out)


def test_hf_directory_as_backbone(tmp_path):
    """A local HF CLIP directory (save_pretrained) is a valid ``clip=``; weights load exactly."""
    from transformers import CLIPModel

    from ptrain.model.clip import named_clip_config

    hf = CLIPModel(named_clip_config("tiny", S)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = build_model(ModelConfig(clip=str(tmp_path / "hf"), frame_size=S, num_frames=T)).eval()
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(ids)[0], hf.get_text_features(input_ids=ids).pooler_output)
    assert float(model.logit_scale().detach()) == pytest.approx(float(hf.logit_scale.detach().exp()), rel=1e-6)


@pytest.mark.parametrize("doc_file", ["README.md", "docs/model.md"])
def test_docs_example_embeds_a_folder_of_videos(tmp_path, doc_file):
    """The ten-line example shown in the README and docs/model.md, run on PyAV-made videos and a tiny export."""
    import re
    from pathlib import Path

    import av
    import numpy as np

    save_export(_model("seqTransf"), tmp_path / "exports" / "msrvtt_seqTransf")
    (tmp_path / "videos").mkdir()
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        with av.open(str(tmp_path / "videos" / f"v{k}.mp4"), "w") as box:
            stream = box.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(12):
                img = np.zeros((48, 64, 3), np.uint8)
                img[:, (i * 4) % 64 :] = colour
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    box.mux(packet)
            for packet in stream.encode():
                box.mux(packet)
    doc = (Path(__file__).parent.parent / doc_file).read_text()
    code = re.search(r"```python\n(import glob.*?)```", doc, re.S).group(1)
    assert len(code.strip().splitlines()) <= 14
    import contextlib
    import io
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(code, doc_file, "exec"), {})
    finally:
        os.chdir(cwd)
    assert sorted(eval(out.getvalue())) == ["videos/v0.mp4", "videos/v1.mp4", "videos/v2.mp4"]
