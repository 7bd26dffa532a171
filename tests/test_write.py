"""Shard writing and the resume scan: atomic commit, verification, and never touching files that aren't ours."""

import json
import tarfile

import pytest

from sharding.write import ForeignShardsError, scan_output, write_shard

V = {"av": "x"}


def write(out, stem, plan="p1", versions=V, n=2):
    samples = [(f"vid_{i:04d}", {"txt": b"a caption", "json": b"{}", "000.jpg": b"\xff\xd8jpeg"}) for i in range(n)]
    return write_shard(out, stem, samples, {"plan_hash": plan, "versions": versions})


def test_tar_is_sorted_reproducible_and_sidecar_matches(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sa, sb = write(a, "shard-000000"), write(b, "shard-000000")
    assert (a / "shard-000000.tar").read_bytes() == (b / "shard-000000.tar").read_bytes()
    assert sa["sha256"] == sb["sha256"] and sa["samples"] == 2
    with tarfile.open(a / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    sidecar = json.loads((a / "shard-000000.json").read_text())
    assert sidecar["keys"] == ["vid_0000", "vid_0001"]
    raw = (a / "shard-000000.tar").read_bytes()
    for key, (start, length) in zip(sidecar["keys"], sidecar["offsets"]):
        import io as _io

        with tarfile.open(fileobj=_io.BytesIO(raw[start: start + length] + b"\0" * 1024)) as part:
            assert sorted(m.name for m in part.getmembers()) == [f"{key}.000.jpg", f"{key}.json", f"{key}.txt"]


def test_only_jpg_json_txt_and_safe_keys(tmp_path):
    with pytest.raises(ValueError, match="only"):
        write_shard(tmp_path, "s-000000", [("k", {"pkl": b"x"})], {})
    with pytest.raises(ValueError, match="unsafe sample key"):
        write_shard(tmp_path, "s-000000", [("../k", {"txt": b"x"})], {})


def test_scan_keeps_verified_and_removes_our_damaged_files(tmp_path):
    stems = [f"shard-{i:06d}" for i in range(4)]
    for s in stems[:3]:
        write(tmp_path, s)
    (tmp_path / "shard-000001.json").unlink()  # crash between rename and sidecar
    data = bytearray((tmp_path / "shard-000002.tar").read_bytes())
    data[700] ^= 0xFF  # same size, flipped bytes
    (tmp_path / "shard-000002.tar").write_bytes(bytes(data))
    (tmp_path / ".shard-000003.tar.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000999.tar").write_bytes(b"not planned: left alone")
    (tmp_path / ".other.tmp").write_bytes(b"not ours: left alone")
    committed, removed = scan_output(tmp_path, stems, "p1", V, marker_plan="p1")
    assert list(committed) == ["shard-000000"]
    assert sorted(removed) == [".shard-000003.tar.tmp", "shard-000001.tar", "shard-000002.tar"]
    assert (tmp_path / "shard-000999.tar").exists() and (tmp_path / ".other.tmp").exists()


def test_scan_refuses_foreign_files(tmp_path):
    write(tmp_path, "shard-000000")
    with pytest.raises(ForeignShardsError, match="not written by `ptrain shard`"):
        scan_output(tmp_path, ["shard-000000"], "p1", V, marker_plan=None)
    with pytest.raises(ForeignShardsError, match="different plan"):
        scan_output(tmp_path, ["shard-000000"], "p2", V, marker_plan="p1")
    with pytest.raises(ForeignShardsError, match="same library versions"):
        scan_output(tmp_path, ["shard-000000"], "p1", {"av": "y"}, marker_plan="p1")
    assert (tmp_path / "shard-000000.tar").exists()


def test_scan_refuses_another_shard_format_and_rewrites_a_malformed_sidecar(tmp_path):
    sidecar = write(tmp_path, "shard-000000")
    assert sidecar["format_version"] == 2 and sidecar["shard"] == "shard-000000.tar"
    old = {k: v for k, v in sidecar.items() if k != "format_version"}  # what the sharder wrote before format 2
    (tmp_path / "shard-000000.json").write_text(json.dumps(old))
    with pytest.raises(ForeignShardsError, match="written in shard format 1, this run writes format 2"):
        scan_output(tmp_path, ["shard-000000"], "p1", V, marker_plan="p1")
    assert (tmp_path / "shard-000000.tar").exists()
    # a sidecar the contract refuses (more samples than the tar can hold) is a damaged commit: rewritten
    (tmp_path / "shard-000000.json").write_text(json.dumps({**sidecar, "samples": 10**6}))
    committed, removed = scan_output(tmp_path, ["shard-000000"], "p1", V, marker_plan="p1")
    assert committed == {} and removed == ["shard-000000.tar"] and not (tmp_path / "shard-000000.json").exists()
