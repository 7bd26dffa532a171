"""Hostile and broken shards (issue 8, root causes 2 and 9): tars whose headers are out of range, sidecars that lie,
``pipe:`` sources. Each hostile tar is a valid shard written by the test fixtures with header bytes patched (and
the checksum made right again), or with an extra header inserted byte by byte. The readers run in a child
interpreter under a wall-clock and a memory limit, so a regression that loops fails the test instead of hanging
the suite."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_fixtures import make_frame, write_shard
from ptrain.data.format import MAX_SAMPLE_BYTES, make_sidecar

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["v0_0000", "v1_0000", "v2_0000"]
FIRST_OF_V1 = 4  # members per sample: .000.jpg .001.jpg .json .txt; header 4 is v1's first


def _bounded(code: str, *args, timeout: float = 120, mem_gib: int = 4) -> dict:
    """Run ``code`` in a fresh interpreter with ``args`` as sys.argv[1:], under ``timeout`` seconds and a
    ``mem_gib`` address-space limit; its last stdout line is JSON. A child that runs over fails the test."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_gib << 30, mem_gib << 30))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    try:
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, preexec_fn=limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the readers did not finish within {timeout} s on a hostile input (a hang)")
    assert r.returncode == 0, f"child failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# building hostile tars byte by byte


def _valid_shard(tmp: Path) -> tuple[bytes, list[int]]:
    """A 3-sample shard in the `ptrain shard` format; its bytes and the offset of every member header."""
    samples = [{"key": k, "video_id": k[:2], "caption": f"clip {i}", "frames": [make_frame(16, 16, t, i) for t in range(2)]}
               for i, k in enumerate(KEYS)]
    tar = write_shard(tmp / "valid", "shard", 0, samples)
    with tarfile.open(tar) as tf:
        heads = [m.offset for m in tf]
    assert len(heads) == 4 * len(KEYS)
    return tar.read_bytes(), heads


def _set_field(blob: bytes, hdr: int, start: int, value: bytes) -> bytes:
    """``blob`` with ``value`` written at ``start`` of the header at ``hdr``, its checksum recomputed."""
    out = bytearray(blob)
    out[hdr + start : hdr + start + len(value)] = value
    block = out[hdr : hdr + 512]
    block[148:156] = b" " * 8
    out[hdr + 148 : hdr + 156] = b"%06o\0 " % sum(block)
    return bytes(out)


def _header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime, info.mode = size, kind, 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _extra(kind: bytes, data: bytes, size: int | None = None) -> bytes:
    """A pax (``x``) or GNU long-name (``L``) header with ``data`` (its size field says ``size``, default the
    data's length), padded to whole blocks."""
    name = "././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "PaxHeader/x"
    return _header(name, len(data) if size is None else size, kind) + data + bytes(-len(data) % 512)


def _rec(key: str, value: str) -> bytes:
    """One well-formed pax record ``"LEN key=value\\n"``."""
    body = f" {key}={value}\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return f"{n}{body}".encode()


def _hostile(blob: bytes, heads: list[int]) -> dict[str, bytes]:
    """Every hostile variant of the valid shard: sample v0 is intact, the damage sits at v1's first header."""
    at = heads[FIRST_OF_V1]
    size_field = lambda v: _set_field(blob, at, 124, v)  # noqa: E731
    insert = lambda extra: blob[:at] + extra + blob[at:]  # noqa: E731
    return {
        # the reported hang: -512 moved the walk back onto the same header, forever, growing a list
        "size -512 (octal with a sign)": size_field(b"-0000001000\0"),
        "size -1": size_field(b"-0000000001\0"),
        "size negative base-256": size_field(b"\xff" * 12),
        "size 8 GiB past the end": size_field(b"77777777777\0"),
        "size 10^15 base-256": size_field(b"\x80" + (10**15).to_bytes(11, "big")),
        "size not octal": size_field(b"0000000001_0"),
        "pax record of length 0": insert(_extra(tarfile.XHDTYPE, b"0 path=v1_0000.000.jpg\n")),
        "pax record of negative length": insert(_extra(tarfile.XHDTYPE, b"-9 path=x\n")),
        "pax record longer than its header": insert(_extra(tarfile.XHDTYPE, b"999 path=x\n")),
        "pax record without =": insert(_extra(tarfile.XHDTYPE, b"11 pathxyz\n")),
        "pax size negative": insert(_extra(tarfile.XHDTYPE, _rec("size", "-512"))),
        "pax size 10^12": insert(_extra(tarfile.XHDTYPE, _rec("size", str(10**12)))),
        "pax path of 10 kB": insert(_extra(tarfile.XHDTYPE, _rec("path", "p" * 10_000))),
        "pax header of 8 GiB - 1": insert(_extra(tarfile.XHDTYPE, _rec("path", "x"), size=(8 << 30) - 1)),
        "GNU long name of 1 MiB": insert(_extra(tarfile.GNUTYPE_LONGNAME, b"n" * (1 << 20))),
        "GNU long name of 8 GiB - 1": insert(_extra(tarfile.GNUTYPE_LONGNAME, b"n", size=(8 << 30) - 1)),
        "cut inside a member": blob[: at + 600],
        "garbage header": blob[:at] + b"\x01" * 512 + blob[at + 512 :],
    }


_READERS = r"""
import io, json, sys
from ptrain.data import shards
path = sys.argv[1]
members, damaged = shards.walk_tar(path)
index = shards.index_tar(path)
stats = {}
with open(path, "rb") as f:
    streamed = [key for key, _ in shards.iter_tar_stream(f, stats)]
print(json.dumps({"damaged": damaged, "members": len(members), "index": [s.key for s in index.samples],
                  "truncated": index.truncated, "streamed": streamed, "stream_stats": stats}))
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    blob, heads = _valid_shard(tmp)
    paths = {}
    for i, (name, data) in enumerate(_hostile(blob, heads).items()):
        paths[name] = tmp / f"h{i:02d}.tar"
        paths[name].write_bytes(data)
    return tmp, paths


CASES = list(_hostile(b"\0" * 20 * 512, [512 * i for i in range(20)]))  # names only


@pytest.mark.parametrize("case", CASES)
def test_hostile_header_marks_the_shard_damaged_and_keeps_what_precedes(hostile, case):
    """walk_tar / index_tar / the streamed walk stop at the hostile header, quickly and within bounded memory:
    damaged, the whole sample before it kept, nothing after it trusted."""
    _, paths = hostile
    out = _bounded(_READERS, paths[case], timeout=60, mem_gib=1)
    assert out["damaged"] and out["truncated"], out
    assert out["members"] == FIRST_OF_V1 and out["index"] == ["v0_0000"], out
    assert out["streamed"] == ["v0_0000"] and out["stream_stats"] == {"shards_truncated": 1}, out


def test_valid_shard_reads_whole(hostile):
    tmp, _ = hostile
    out = _bounded(_READERS, tmp / "valid" / "shard-000000.tar", timeout=60, mem_gib=1)
    assert out == {"damaged": False, "members": 12, "index": KEYS, "truncated": False, "streamed": KEYS,
                   "stream_stats": {}}


def test_pax_and_long_names_that_are_in_range_still_read(tmp_path):
    """The checks refuse only what is out of range: a pax path/size and a GNU long name of sane size are read."""
    from ptrain.data.shards import index_tar, iter_tar_stream

    blob, heads = _valid_shard(tmp_path)
    at = heads[FIRST_OF_V1]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        size = tf.getmembers()[FIRST_OF_V1].size
    pax = _extra(tarfile.XHDTYPE, _rec("path", "v1_0000.000.jpg") + _rec("size", str(size)) + _rec("mtime", "0"))
    long_name = _extra(tarfile.GNUTYPE_LONGNAME, b"v1_0000.000.jpg\0")
    for extra in (pax, long_name):
        path = tmp_path / "ok.tar"
        path.write_bytes(blob[:at] + extra + blob[at:])
        index = index_tar(str(path))
        assert [s.key for s in index.samples] == KEYS and not index.truncated
        assert [k for k, _ in iter_tar_stream(io.BytesIO(path.read_bytes()), {})] == KEYS


def test_read_span_refuses_a_span_before_reading_it(tmp_path):
    from ptrain.data.shards import read_span

    blob, heads = _valid_shard(tmp_path)
    f = io.BytesIO(blob)
    with pytest.raises(ValueError, match="not a sample span"):
        read_span(f, 0, 10**12)
    with pytest.raises(ValueError, match="not a sample span"):
        read_span(f, -5, 100)
    with pytest.raises(EOFError):
        read_span(f, heads[FIRST_OF_V1], MAX_SAMPLE_BYTES)
    assert read_span(f, 0, heads[FIRST_OF_V1])[0] == "v0_0000"


def test_a_stream_of_endless_members_of_one_sample_stops_at_the_sample_bound():
    """A stream has no size to check against: a sample growing past MAX_SAMPLE_BYTES is damage, not memory."""
    from ptrain.data import shards

    class Endless(io.RawIOBase):  # member after member of one sample, 32 MiB each, never ending
        def __init__(self):
            self.member, self.pos, self.i = b"", 0, 0

        def readable(self):
            return True

        def readinto(self, buf):
            if self.pos == len(self.member):
                self.member = _header(f"v0_0000.{self.i:03d}.jpg", 32 << 20, tarfile.REGTYPE) + bytes(32 << 20)
                self.pos, self.i = 0, self.i + 1
            n = min(len(buf), len(self.member) - self.pos)
            buf[:n] = self.member[self.pos : self.pos + n]
            self.pos += n
            return n

    stats: dict = {}
    stream = Endless()
    assert list(shards.iter_tar_stream(io.BufferedReader(stream), stats)) == []
    assert stats == {"shards_truncated": 1, "samples_truncated": 1}
    assert stream.i * (32 << 20) <= MAX_SAMPLE_BYTES + (64 << 20)  # it stopped reading soon after the bound


# ----------------------------------------------------------------------------------------------
# sidecars that disagree with their tar


def _sidecar(tar: Path, **fields) -> None:
    blob = tar.read_bytes()
    side = make_sidecar(tar.name, KEYS, [], len(blob), "0" * 64)
    del side["offsets"]
    side.update(fields)
    tar.with_suffix(".json").write_text(json.dumps(side))


_DISCOVER = r"""
import json, sys
from ptrain.data import shards
stats = {}
found = shards.discover([sys.argv[1]], stats=stats)
print(json.dumps({"found": [[s.path.rsplit("/", 1)[1], s.samples] for s in found], "stats": stats}))
"""


def test_sidecars_that_the_tar_cannot_back_are_skipped_and_counted(tmp_path):
    blob, heads = _valid_shard(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    good = d / "a-000000.tar"
    good.write_bytes(blob)
    _sidecar(good)
    lies = {
        "b": {"samples": 10**12},  # count of 10^12 (keys disagree too)
        "c": {"samples": 1000, "keys": ["k"] * 1000, "bytes": 10**16},  # forged bytes: the count meets the file
        "d": {"offsets": [[0, 10**12], [0, 512], [0, 512]]},  # a span of 10^12 bytes
        "e": {"offsets": [[len(blob) - 512, 4096], [0, 512], [0, 512]]},  # a span past the end of the tar
        "f": {"samples": -3},
        "g": {"bytes": "many"},
    }
    for name, fields in lies.items():
        tar = d / f"{name}-000000.tar"
        tar.write_bytes(blob)
        _sidecar(tar, **fields)
    (d / "h-000000.tar").write_bytes(blob)
    (d / "h-000000.json").write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than the parser's stack
    (d / "i-000000.tar").write_bytes(blob)
    os.mkfifo(d / "i-000000.json")  # opening a FIFO would block forever
    (d / "j-000000.tar").write_bytes(blob)
    with open(d / "j-000000.json", "wb") as f:  # 65 MiB (sparse): refused by its size, never read
        f.truncate(65 << 20)
    out = _bounded(_DISCOVER, d, timeout=60, mem_gib=1)
    assert out == {"found": [["a-000000.tar", 3]], "stats": {"shards_bad_sidecar": 9}}


def test_a_tar_that_changed_size_is_walked_not_trusted(tmp_path):
    """``bytes`` differing from the tar's size at discovery: counted, the sidecar's offsets dropped (the loader
    walks the headers), the count kept only while the tar can hold it."""
    from ptrain.data.shards import discover, read_sidecar

    blob, heads = _valid_shard(tmp_path)
    tar = tmp_path / "s-000000.tar"
    tar.write_bytes(blob[: heads[8] + 700])  # cut inside v2's first frame
    _sidecar(tar, bytes=len(blob), offsets=[[0, heads[4]], [heads[4], heads[8] - heads[4]], [heads[8], len(blob) - heads[8]]])
    side = read_sidecar(str(tar))
    assert side["changed"] and "offsets" not in side and "keys" not in side and side["samples"] == 3
    stats: dict = {}
    assert [s.samples for s in discover([str(tar)], stats=stats)] == [3] and stats == {"shards_changed": 1}
    tar.write_bytes(blob[:4096])  # now too small for 3 samples: the count itself is not trusted
    with pytest.raises(ValueError, match="cannot fit"):
        read_sidecar(str(tar))


def test_streamed_sidecars_must_back_their_count(tmp_path):
    """A streamed shard's sidecar cannot be checked against the tar's size: its count must match its own keys."""
    from ptrain.data.shards import read_stream_sidecar

    blob, _ = _valid_shard(tmp_path)
    tar = tmp_path / "s-000000.tar"
    tar.write_bytes(blob)
    side = tmp_path / "s-000000.json"
    _sidecar(tar)
    assert read_stream_sidecar(f"file://{side}")["samples"] == 3
    assert read_stream_sidecar(f"pipe:cat {side}")["keys"] == KEYS
    for fields, match in [({"samples": 10**12}, "cannot fit in a 20480-byte tar"),
                          ({"samples": 10**12, "bytes": None}, "'keys' must list"),
                          ({"samples": 10**12, "bytes": None, "keys": None}, "must list its keys"),
                          ({"offsets": [[0, 10**12]] * 3}, "longer than a sample can be")]:
        _sidecar(tar, **fields)
        with pytest.raises(ValueError, match=match):
            read_stream_sidecar(f"file://{side}")
    side.write_text("[" * 100_000)
    with pytest.raises(ValueError, match="unreadable sidecar"):
        read_stream_sidecar(f"file://{side}")
    with open(side, "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(ValueError, match="a sidecar has at most"):
        read_stream_sidecar(f"file://{side}")
    with pytest.raises(OSError, match="exited with status 1"):
        read_stream_sidecar("pipe:false")


# ----------------------------------------------------------------------------------------------
# end to end through the loaders


_LOADERS = r"""
import json, sys
from ptrain.data import DataConfig, build_eval_loader, build_train_loader
d = sys.argv[1]
sizes = dict(num_frames=2, frame_size=16, max_words=8)
ev = build_eval_loader(DataConfig(num_workers=0), batch_size=4, sources=[d], **sizes)
valid = [k for b in ev for k, v in zip(b["keys"], b["valid"].tolist()) if v]
tr = build_train_loader(DataConfig(sources=[d], num_workers=0), micro_batch_size=3, seed=0, **sizes)
it = iter(tr)
seen = [k for _ in range(8) for k in next(it)["keys"]]
print(json.dumps({"eval": valid, "eval_stats": dict(ev.stats), "train": seen, "train_stats": dict(tr.stats)}))
"""


def _loader_dir(tmp_path: Path) -> Path:
    """One good shard, one whose v1 header has size -512 (the reported hang), one with a 10^12-sample sidecar."""
    blob, heads = _valid_shard(tmp_path)
    d = tmp_path / "e2e"
    d.mkdir()
    for name, data, fields in [("a", blob, {}), ("b", _hostile(blob, heads)["size -512 (octal with a sign)"], {}),
                               ("c", blob, {"samples": 10**12})]:
        tar = d / f"{name}-000000.tar"
        tar.write_bytes(data)
        _sidecar(tar, **fields)
    return d


def test_loaders_skip_and_count_a_hostile_shard(tmp_path):
    d = _loader_dir(tmp_path)
    out = _bounded(_LOADERS, d, timeout=240, mem_gib=6)
    assert out["eval"] == KEYS + ["v0_0000"]  # a: whole; b: the sample before the hostile header; c: skipped
    assert out["eval_stats"] == {"shards_bad_sidecar": 1, "samples_missing": 2, "shards_damaged": 1,
                                 "format_v2": len(out["eval"])}  # the samples read, by shard format version
    assert set(out["train"]) == set(KEYS) and "" not in out["train"]  # micro-batches stay full
    assert out["train_stats"]["shards_bad_sidecar"] == 1 and out["train_stats"]["shards_damaged"] == 1
    assert out["train_stats"]["samples_missing"] >= 2


_STREAMED = r"""
import json, sys
from ptrain.data import DataConfig, build_train_loader
sizes = dict(num_frames=2, frame_size=16, max_words=8)
cfg = DataConfig(sources=[sys.argv[1]], num_workers=0, allow_pipe=True)
tr = build_train_loader(cfg, micro_batch_size=2, seed=0, **sizes)
it = iter(tr)
seen = [k for _ in range(6) for k in next(it)["keys"]]
print(json.dumps({"train": seen, "stats": dict(tr.stats)}))
"""


def test_streamed_loader_skips_and_counts_hostile_shards(tmp_path):
    """The same hostile headers read through a pipe: source (the streamed path): counted, never a hang."""
    blob, heads = _valid_shard(tmp_path)
    d = tmp_path / "st"
    d.mkdir()
    hostile = _hostile(blob, heads)
    for i, data in enumerate([blob, hostile["size -512 (octal with a sign)"], hostile["pax record of length 0"]]):
        tar = d / f"s-{i:06d}.tar"
        tar.write_bytes(data)
        _sidecar(tar)
    out = _bounded(_STREAMED, f"pipe:cat {d}/s-{{000000..000002}}.tar", timeout=240, mem_gib=6)
    assert set(out["train"]) == set(KEYS)
    assert out["stats"]["shards_truncated"] >= 2 and "shards_unreadable" not in out["stats"]


# ----------------------------------------------------------------------------------------------
# pipe: sources (root cause 9)


def test_pipe_sources_are_refused_unless_allowed(tmp_path):
    from ptrain.config import ConfigError, load_config
    from ptrain.data import DataConfig

    src = "pipe:curl -s http://127.0.0.1:1/x.tar | sh"
    with pytest.raises(ValueError, match=r"sources\[0\] 'pipe:curl .*allow_pipe=true"):
        DataConfig(sources=[src])
    with pytest.raises(ValueError, match=r"eval_sources\[1\] 'pipe:cat x.tar'.*allow_pipe"):
        DataConfig(eval_sources=["/data/a", "pipe:cat x.tar"])
    with pytest.raises(ConfigError, match=r"sources\[0\].*allow_pipe"):
        load_config(DataConfig, None, [f"sources=[{src!r}]"])
    assert DataConfig(sources=[src], allow_pipe=True).sources[0]["path"] == src


def test_pipe_commands_run_without_a_shell(tmp_path):
    """Shell syntax in a pipe: command is plain arguments: no second command runs, no substitution happens;
    the command's failure (cat of a file named ';') is an OSError at the end of its stream."""
    from ptrain.data.shards import iter_tar_stream, open_stream

    blob, _ = _valid_shard(tmp_path)
    (tmp_path / "s.tar").write_bytes(blob)
    marker = tmp_path / "owned"
    for cmd in (f"cat {tmp_path}/s.tar ; touch {marker}", f"cat {tmp_path}/s.tar $(touch {marker})",
                f"cat {tmp_path}/s.tar && touch {marker}", f"cat {tmp_path}/s.tar `touch {marker}`"):
        stats: dict = {}
        with pytest.raises(OSError, match="exited with status 1"):
            with open_stream(f"pipe:{cmd}") as f:
                list(iter_tar_stream(f, stats))
        assert not marker.exists(), cmd
    with open_stream(f"pipe:cat '{tmp_path}/s.tar'") as f:  # quoting still works: split by shell rules
        assert [k for k, _ in iter_tar_stream(f, {})] == KEYS
    with pytest.raises(ValueError, match="check its quotes"):
        open_stream("pipe:cat 'x.tar")
    with pytest.raises(ValueError, match="empty pipe: command"):
        open_stream("pipe:  ")


def test_pipe_command_status_and_early_stop(tmp_path):
    from ptrain.data.shards import iter_tar_stream, open_stream

    with pytest.raises(OSError, match="exited with status 1"):
        with open_stream(f"pipe:cat {tmp_path}/missing.tar") as f:
            list(iter_tar_stream(f, {}))
    # endless garbage: the walk stops at the first header and closing stops the command
    stats: dict = {}
    with open_stream("pipe:yes") as f:
        assert list(iter_tar_stream(f, stats)) == []
    assert stats == {"shards_truncated": 1}
    assert f.proc.poll() is not None


def test_urls_never_reach_a_shell(tmp_path, monkeypatch):
    """http(s) goes to curl as one argument (webdataset's gopen_curl), and GOPEN_REWRITE, which could turn a URL
    into a pipe: command, is not applied."""
    from ptrain.data.shards import iter_tar_stream, open_stream

    marker = tmp_path / "owned"
    monkeypatch.setenv("GOPEN_REWRITE", f"https://=pipe:touch {marker} #")
    for url in (f"https://127.0.0.1:1/x$(touch {marker}).tar", f"http://127.0.0.1:1/x;touch {marker}"):
        stream = open_stream(url)
        assert stream.proc.args[0] == "curl" and stream.proc.args[-1] == url  # an argument list, no shell
        stream.proc.kill()
        stream.proc.wait()
    assert not marker.exists()
    with pytest.raises(ValueError, match="no reader for nope://"):
        open_stream("nope://host/x.tar")
    (tmp_path / "s.tar").write_bytes(_valid_shard(tmp_path)[0])
    with open_stream(f"file://{tmp_path}/s.tar") as f:
        assert [k for k, _ in iter_tar_stream(f, {})] == KEYS


# ----------------------------------------------------------------------------------------------
# brace expansion (the braceexpand package)


def test_brace_expansion_and_its_bound():
    from ptrain.data.shards import MAX_EXPANDED_NAMES, expand_braces

    assert expand_braces("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("s-{a,b{c,d}}.tar") == ["s-a.tar", "s-bc.tar", "s-bd.tar"]
    assert expand_braces("/data/plain.tar") == ["/data/plain.tar"]
    assert expand_braces(r"C:\data\x-{1..2}.tar") == [r"C:\data\x-1.tar", r"C:\data\x-2.tar"]  # no escapes
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_braces("a-{000..009.tar")
    assert len(expand_braces("a{0..999}{0..998}")) == 999_000
    # braceexpand makes a tuple of every range before its lazy product: 10^12 names would fill any memory
    code = r"""
import json, sys
from ptrain.data.shards import expand_braces
errors = []
for pattern in sys.argv[1:]:
    try:
        expand_braces(pattern)
    except ValueError as e:
        errors.append(str(e))
print(json.dumps(errors))
"""
    patterns = ["s-{000000000000..999999999999}.tar", "s-{0..99999999999..2}.tar", "s-{a,{0..99999999999}}.tar",
                "s-{0..999}{0..999}{0..999}.tar"]
    errors = _bounded(code, *patterns, timeout=60, mem_gib=1)
    assert len(errors) == 4 and all(f"more than {MAX_EXPANDED_NAMES} names" in e for e in errors), errors
