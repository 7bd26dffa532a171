"""Tampered export directories given to ``ptrain.load`` (issue 8, root cause 7): each is a real tiny export with
config.json, the vocabulary or the weights changed the way an attacker or a broken copy would. Every one must end
in one clear ValueError naming the file, the value and the fix; paths must never leave the export directory (no
byte of an outside file may reach the error); a huge dimension must be refused before anything is allocated."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ptrain
from ptrain.model import ModelConfig, build_model, save_export

ROOT = Path(__file__).resolve().parents[1]
SECRET = "TOPSECRET-4f1d"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny real exports: seqTransf (a head stack and a frame position table) and TAB (alignment centres)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for head in ("seqTransf", "TAB"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = build_model(ModelConfig(clip="tiny", head=head, frame_size=32, num_frames=4, max_words=8,
                                            cross_layers=2))
        out[head] = save_export(model.eval(), root / head)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(export: Path, change) -> Path:
    """Apply ``change(config_dict)`` to export/config.json."""
    cfg = json.loads((export / "config.json").read_text())
    change(cfg)
    (export / "config.json").write_text(json.dumps(cfg))
    return export


def _load_error(export: Path) -> str:
    with pytest.raises(ValueError) as e:
        ptrain.load(export)
    return str(e.value)


def test_untampered_exports_load(exports):
    for head, path in exports.items():
        assert ptrain.load(path).cfg.head == head


def test_unknown_head_names_the_file_the_value_and_the_known_heads(exports, tmp_path):
    export = _edit(_copy(exports["seqTransf"], tmp_path / "x"), lambda c: c["ptrain"]["model"].update(head="Evil"))
    msg = _load_error(export)
    assert str(export / "config.json") in msg and "'Evil'" in msg
    assert "meanP, seqLSTM, seqTransf, tightTransf, TDB, TAB" in msg


# ----------------------------------------------------------------------------------------------
# paths: the vocabulary, config.json and the weights stay inside the export


def _outside_file(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt.gz"
    secret.write_text(SECRET + "\n")
    return secret


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "hf_dir_symlink", "model_tokenizer_absolute"])
def test_vocabulary_outside_the_export_is_refused_unread(exports, tmp_path, how):
    secret = _outside_file(tmp_path)
    export = _copy(exports["seqTransf"], tmp_path / "x")
    if how == "dotdot":
        _edit(export, lambda c: c["ptrain"]["tokenizer"].update(vocab="../secret.txt.gz"))
    elif how == "absolute":
        _edit(export, lambda c: c["ptrain"]["tokenizer"].update(vocab=str(secret)))
    elif how == "symlink":  # the name the export lists is a link leading out
        (export / "bpe_simple_vocab_16e6.txt.gz").unlink()
        os.symlink(secret, export / "bpe_simple_vocab_16e6.txt.gz")
    elif how == "hf_dir_symlink":
        (export / "tokenizer").mkdir()
        (export / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
        os.symlink(secret, export / "tokenizer" / "vocab.json")
        _edit(export, lambda c: (c["ptrain"]["tokenizer"].update(vocab="tokenizer"),
                                 c["ptrain"]["model"].update(tokenizer="tokenizer")))
    else:  # an export of before the copy (vocabulary = the shipped one) whose model section names a file
        (export / "bpe_simple_vocab_16e6.txt.gz").unlink()
        _edit(export, lambda c: (c["ptrain"]["tokenizer"].update(vocab="ptrain/model/bpe_simple_vocab_16e6.txt.gz"),
                                 c["ptrain"]["model"].update(tokenizer=str(secret))))
    msg = _load_error(export)
    assert str(export / "config.json") in msg and SECRET not in msg
    assert "outside the export" in msg or "not a path inside the export" in msg or "carries none" in msg


def test_a_model_tokenizer_path_is_never_used_when_the_export_has_its_vocabulary(exports, tmp_path):
    secret = _outside_file(tmp_path)
    export = _edit(_copy(exports["seqTransf"], tmp_path / "x"),
                   lambda c: c["ptrain"]["model"].update(tokenizer=str(secret)))
    model = ptrain.load(export)
    assert model.cfg.tokenizer == model.tokenizer_path == str((export / "bpe_simple_vocab_16e6.txt.gz").resolve())


_OPENS_NOTHING = r"""
import json, os, sys
import ptrain
export, fifo = sys.argv[1], sys.argv[2]
errors = []
for vocab in ["../fifo", fifo, "link"]:
    cfg = json.load(open(os.path.join(export, "config.json")))
    cfg["ptrain"]["tokenizer"]["vocab"] = vocab
    json.dump(cfg, open(os.path.join(export, "config.json"), "w"))
    try:
        ptrain.load(export)
    except ValueError as e:
        errors.append(str(e))
print(json.dumps(errors))
"""


def test_outside_vocabulary_is_refused_without_opening_it(exports, tmp_path):
    """The outside file is a FIFO: opening it would block, so a load that opened it would run past the limit."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    export = _copy(exports["seqTransf"], tmp_path / "x")
    os.symlink(fifo, export / "link")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        r = subprocess.run([sys.executable, "-c", _OPENS_NOTHING, str(export), str(fifo)], capture_output=True,
                           text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("ptrain.load opened a vocabulary outside the export (it blocked on the FIFO)")
    assert r.returncode == 0, r.stderr[-3000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(errors) == 3 and all("config.json" in e and "export directory" in e for e in errors), errors


def test_config_and_weights_that_are_links_out_of_the_export_are_refused(exports, tmp_path):
    for name in ("config.json", "model.safetensors"):
        export = _copy(exports["seqTransf"], tmp_path / name)
        moved = tmp_path / f"outside-{name}"
        (export / name).rename(moved)
        os.symlink(moved, export / name)
        msg = _load_error(export)
        assert "resolves outside the export directory" in msg and name in msg


# ----------------------------------------------------------------------------------------------
# malformed config.json: one clear error each


@pytest.mark.parametrize("text,match", [
    ("{not json", r"config.json: not valid JSON \(Expecting property name"),
    ('[1, 2, 3]', r"config.json: holds a JSON list, not an object"),
    ('{"model_type": "clip"}', r"has no 'ptrain' section"),
    ('{"ptrain": "x"}', r"the 'ptrain' section must be an object, got str"),
    ('\xff\xfe garbage', r"config.json: not valid"),
])
def test_config_json_that_is_not_a_ptrain_config(exports, tmp_path, text, match):
    export = _copy(exports["seqTransf"], tmp_path / "x")
    (export / "config.json").write_text(text, encoding="latin-1")
    assert str(export / "config.json") in _load_error(export)
    with pytest.raises(ValueError, match=match):
        ptrain.load(export)


@pytest.mark.parametrize("where,value,match", [
    (("model",), "seqTransf", r"ptrain.model must be an object, got str"),
    (("model", "num_frames"), "12", r"ptrain.model.num_frames must be int, got '12'"),
    (("model", "compat"), "yes", r"ptrain.model.compat must be bool, got 'yes'"),
    (("model", "tab_weight"), float("nan"), r"ptrain.model.tab_weight must be a finite number, got nan"),
    (("model", "linear_patch"), "4d", r"ptrain.model.linear_patch must be '2d', '3d', got '4d'"),
    (("model", "num_frames"), 10**9, r"num_frames=1000000000 is more than a shard holds"),
    (("model", "frame_size"), 64, r"frame_size=64 but the weights take 32x32 frames"),
    (("logit_scale",), float("nan"), r"ptrain.logit_scale must be a finite positive number, got nan"),
    (("logit_scale",), float("inf"), r"ptrain.logit_scale must be a finite positive number, got inf"),
    (("logit_scale",), -3, r"ptrain.logit_scale must be a finite positive number, got -3"),
    (("format_version",), "1", r"ptrain.format_version must be an integer, got '1'"),
    (("tokenizer",), [], r"ptrain.tokenizer must be an object, got list"),
])
def test_wrong_values_in_the_ptrain_section(exports, tmp_path, where, value, match):
    def change(cfg):
        node = cfg["ptrain"]
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value

    export = _edit(_copy(exports["seqTransf"], tmp_path / "x"), change)
    msg = _load_error(export)
    assert str(export / "config.json") in msg
    with pytest.raises(ValueError, match=match):
        ptrain.load(export)


def test_wrong_types_in_the_clip_config(exports, tmp_path):
    for sub, key, value, match in [("text_config", "hidden_size", "32", "text_config.hidden_size must be a positive integer"),
                                   ("vision_config", "patch_size", -8, "vision_config.patch_size must be a positive integer"),
                                   (None, "text_config", "x", "text_config must be an object, got str"),
                                   (None, "projection_dim", 32.0, "projection_dim must be a positive integer"),
                                   ("vision_config", "layer_norm_eps", "1e-5", "vision_config.layer_norm_eps must be a finite"),
                                   (None, "logit_scale_init_value", float("inf"), "logit_scale_init_value must be a finite")]:
        export = _copy(exports["seqTransf"], tmp_path / f"{sub}-{key}")
        _edit(export, lambda c: (c[sub] if sub else c).update({key: value}))
        with pytest.raises(ValueError, match=match):
            ptrain.load(export)


def test_weights_that_are_not_safetensors_or_have_a_nan_temperature(exports, tmp_path):
    export = _copy(exports["seqTransf"], tmp_path / "garbage")
    (export / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file.*re-export"):
        ptrain.load(export)
    export = _copy(exports["seqTransf"], tmp_path / "nan")
    tensors = load_file(str(export / "model.safetensors"))
    tensors["logit_scale"] = torch.tensor(float("nan"))
    save_file(tensors, str(export / "model.safetensors"))
    with pytest.raises(ValueError, match="logit_scale is nan, not finite"):
        ptrain.load(export)


# ----------------------------------------------------------------------------------------------
# huge dimensions: refused from the weights' shapes before anything is allocated


_HUGE = r"""
import json, os, shutil, sys
import ptrain
src, work = sys.argv[1], sys.argv[2]
edits = json.loads(sys.argv[3])
out = []
for i, (path, value) in enumerate(edits):
    export = os.path.join(work, str(i))
    shutil.copytree(src, export)
    cfg = json.load(open(os.path.join(export, "config.json")))
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    json.dump(cfg, open(os.path.join(export, "config.json"), "w"))
    try:
        ptrain.load(export)
        out.append("loaded")
    except ValueError as e:
        out.append(str(e))
print(json.dumps(out))
"""


def _huge(src: Path, work: Path, edits: list) -> list[str]:
    """Load each edited copy of ``src`` in a child limited to 3 GiB of address space: an allocation sized by the
    config would fail there (MemoryError) instead of passing or filling the machine."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    work.mkdir()
    try:
        r = subprocess.run([sys.executable, "-c", _HUGE, str(src), str(work), json.dumps(edits)], capture_output=True,
                           text=True, timeout=180, preexec_fn=limit, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("ptrain.load did not refuse a huge dimension within 180 s")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_huge_dimensions_are_refused_before_allocating(exports, tmp_path):
    edits = [
        (["text_config", "hidden_size"], 1_000_000),  # the 40 GB of the report
        (["text_config", "vocab_size"], 10**9),
        (["text_config", "max_position_embeddings"], 10**8),
        (["text_config", "intermediate_size"], 10**8),
        (["vision_config", "hidden_size"], 10**6),
        (["vision_config", "image_size"], 4 * 10**5),
        (["vision_config", "num_hidden_layers"], 10**9),
        (["projection_dim"], 10**7),
        (["ptrain", "model", "num_frames"], 1000),  # the frame position table of seqTransf
        (["ptrain", "model", "cross_layers"], 10**6),
    ]
    out = _huge(exports["seqTransf"], tmp_path / "w", edits)
    expect = [
        ("text_config.vocab_size and hidden_size", "text_model.embeddings.token_embedding.weight", "(49408, 1000000)", "(49408, 32)"),
        ("text_config.vocab_size and hidden_size", "text_model.embeddings.token_embedding.weight", "(1000000000, 32)", "(49408, 32)"),
        ("text_config.max_position_embeddings", "text_model.embeddings.position_embedding.weight", "(100000000, 32)", "(77, 32)"),
        ("text_config.intermediate_size", "text_model.encoder.layers.0.mlp.fc1.weight", "(100000000, 32)", "(128, 32)"),
        ("vision_config.hidden_size", "vision_model.embeddings.patch_embedding.weight", "(1000000, 3, 8, 8)", "(32, 3, 8, 8)"),
        ("vision_config.image_size", "vision_model.embeddings.position_embedding.weight", "(2500000001, 32)", "(17, 32)"),
        ("vision_config.num_hidden_layers=1000000000", "vision_model.encoder.layers.", "", "2 layers"),
        ("projection_dim", "visual_projection.weight", "(10000000, 32)", "(32, 32)"),
        ("ptrain.model (head seqTransf)", "head.frame_position_embeddings.weight", "(1000, 32)", "(77, 32)"),
        ("cross_layers=1000000", "head weights hold at most 2 layers", "", ""),
    ]
    for msg, (what, key, want, have) in zip(out, expect):
        assert "config.json" in msg and what in msg and key in msg and want in msg and have in msg, msg
        assert "re-export" in msg, msg


def test_huge_tab_centres_are_refused_from_the_meta_model(exports, tmp_path):
    out = _huge(exports["TAB"], tmp_path / "w", [(["ptrain", "model", "tab_centers"], 10**9)])
    assert "tab.centres" in out[0] and "(1000000000, 32)" in out[0] and "(5, 32)" in out[0], out
