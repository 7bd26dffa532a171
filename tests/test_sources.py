"""The benchmark annotation readers (sharding/sources): tiny files in each benchmark's real format, written here, read
split by split into the expected records; malformed and hostile files give errors naming the file and the entry; the
real MSR-VTT split lists (tests/data/benchmarks) read with their documented counts."""

import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from sharding.sources import SOURCES, Segment, VideoRecord, open_source
from sharding.sources.benchmark import AnnotationError
from sharding.sources.msvd import load_raw_captions

REAL = Path(__file__).parent / "data" / "benchmarks"
FIRST_SPLIT = {"msrvtt": "train9k", "msvd": "train", "lsmdc": "train", "activitynet": "train", "didemo": "train",
               "vatex": "train"}
BENCHMARKS = list(FIRST_SPLIT)


def read(name, root, split):
    return list(open_source(name, SimpleNamespace(annotations=str(root), split=split)).records())


def write(root: Path, name: str, text: str) -> Path:
    p = root / name
    p.write_text(text, encoding="utf-8")
    return p


def write_json(root: Path, name: str, data) -> Path:
    return write(root, name, json.dumps(data))


# ----------------------------------------------------------------------------------------------
# the seam


def test_every_benchmark_is_a_source_row_and_names_itself():
    for name in BENCHMARKS:
        module, cls = SOURCES[name].split(":")
        source_cls = getattr(__import__(module, fromlist=[cls]), cls)
        assert source_cls.name == name


@pytest.mark.parametrize("name", BENCHMARKS)
def test_unknown_split_and_missing_directory_are_clear_errors(name, tmp_path):
    with pytest.raises(AnnotationError, match=rf"{name}: unknown split 'nope'; pass split= one of"):
        read(name, tmp_path, "nope")
    split = FIRST_SPLIT[name]
    with pytest.raises(AnnotationError, match="annotations is required: pass annotations=DIR"):
        open_source(name, SimpleNamespace(split=split))
    with pytest.raises(AnnotationError, match=rf"{tmp_path / 'absent'}: annotations directory not found"):
        read(name, tmp_path / "absent", split)


# ----------------------------------------------------------------------------------------------
# MSR-VTT


def msrvtt_files(root: Path):
    """MSRVTT_data.json with three videos whose sentences interleave, the 9k/7k lists and a JSFUSION file (CRLF, as
    some copies have)."""
    write_json(root, "MSRVTT_data.json", {
        "info": {"year": 2016},
        "videos": [{"category": 9, "url": "https://www.youtube.com/watch?v=a", "video_id": "video0", "id": 0,
                    "start time": 137.72, "end time": 149.44, "split": "train"},
                   {"category": 16, "url": "https://www.youtube.com/watch?v=b", "video_id": "video1", "id": 1,
                    "start time": 184.33, "end time": 206.86, "split": "train"},
                   {"category": 3, "url": "https://www.youtube.com/watch?v=c", "video_id": "video7010", "id": 7010,
                    "start time": 1.0, "end time": 9.0, "split": "test"}],
        "sentences": [{"caption": "a car drives", "video_id": "video0", "sen_id": 0},
                      {"caption": "a man sings", "video_id": "video1", "sen_id": 1},
                      {"caption": "a red car on a road", "video_id": "video0", "sen_id": 2},
                      {"caption": "someone is singing", "video_id": "video1", "sen_id": 3},
                      {"caption": "a race", "video_id": "video0", "sen_id": 4},
                      {"caption": "a dog runs", "video_id": "video7010", "sen_id": 5}],
    })
    write(root, "MSRVTT_train.9k.csv", "video_id\nvideo1\nvideo0\n")
    write(root, "MSRVTT_train.7k.csv", "video_id\nvideo0\n")
    (root / "MSRVTT_JSFUSION_test.csv").write_bytes(
        b"key,vid_key,video_id,sentence\r\nret0,msr7010,video7010,a dog runs on the grass\r\n"
        b"ret1,msr1,video1,a man is singing\r\n")


def test_msrvtt_list_splits_hold_every_caption_in_file_order(tmp_path):
    msrvtt_files(tmp_path)
    assert read("msrvtt", tmp_path, "train9k") == [
        VideoRecord("video1", captions=["a man sings", "someone is singing"], split="train9k", meta={"category": 16}),
        VideoRecord("video0", captions=["a car drives", "a red car on a road", "a race"], split="train9k",
                    meta={"category": 9}),
    ]
    (rec,) = read("msrvtt", tmp_path, "train7k")
    assert (rec.video_id, len(rec.captions), rec.span, rec.stem) == ("video0", 3, None, "video0")


def test_msrvtt_test1kA_is_the_jsfusion_sentence_and_reads_nothing_else(tmp_path):
    msrvtt_files(tmp_path)
    (tmp_path / "MSRVTT_data.json").unlink()
    assert read("msrvtt", tmp_path, "test1kA") == [
        VideoRecord("video7010", captions=["a dog runs on the grass"], split="test1kA"),
        VideoRecord("video1", captions=["a man is singing"], split="test1kA"),
    ]
    src = open_source("msrvtt", SimpleNamespace(annotations=str(tmp_path), split="test1kA"))
    assert list(src.describe()["files"]) == [str(tmp_path / "MSRVTT_JSFUSION_test.csv")]


def test_msrvtt_errors_name_the_file_the_split_and_the_entry(tmp_path):
    msrvtt_files(tmp_path)
    os.remove(tmp_path / "MSRVTT_data.json")
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: not found; split 'train9k' of msrvtt needs "
                                              r"MSRVTT_data.json; unpack msrvtt_data.zip"):
        read("msrvtt", tmp_path, "train9k")
    with pytest.raises(AnnotationError, match=r"MSRVTT_val.full.csv: not found; split 'valfull'.*CLIP2Video"):
        read("msrvtt", tmp_path, "valfull")

    msrvtt_files(tmp_path)
    write(tmp_path, "MSRVTT_train.7k.csv", "video_id\nvideo0\nvideo99\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: no sentence for video 'video99', which "
                                              r"MSRVTT_train.7k.csv lists"):
        read("msrvtt", tmp_path, "train7k")

    data = json.loads((tmp_path / "MSRVTT_data.json").read_text())
    data["sentences"][3] = {"video_id": "video1", "caption": None}
    write_json(tmp_path, "MSRVTT_data.json", data)
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: sentences\[3\]: expected an object with string "
                                              r"video_id and caption"):
        read("msrvtt", tmp_path, "train9k")

    write(tmp_path, "MSRVTT_train.9k.csv", "vid\nvideo0\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_train.9k.csv: the header must name the column\(s\) video_id; "
                                              r"missing video_id"):
        read("msrvtt", tmp_path, "train9k")
    write(tmp_path, "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nret0,msr1,video1\n")
    with pytest.raises(AnnotationError, match=r"MSRVTT_JSFUSION_test.csv: line 2: expected the 4 columns"):
        read("msrvtt", tmp_path, "test1kA")
    write(tmp_path, "MSRVTT_data.json", "{not json")
    with pytest.raises(AnnotationError, match=r"MSRVTT_data.json: not valid JSON"):
        read("msrvtt", tmp_path, "train7k")


def test_real_msrvtt_split_lists_read_with_their_documented_counts(tmp_path):
    """The released JSFUSION 1k-A file and CLIP2Video's full split lists, with a stand-in MSRVTT_data.json (20
    captions a video in the real one; two here) for the 10,000 videos."""
    for p in (REAL / "msrvtt").glob("*.csv"):
        shutil.copy(p, tmp_path / p.name)
    write_json(tmp_path, "MSRVTT_data.json", {
        "videos": [{"video_id": f"video{i}", "category": i % 20} for i in range(10000)],
        "sentences": [{"video_id": f"video{i}", "caption": f"caption {k} of {i}", "sen_id": 2 * i + k}
                      for k in range(2) for i in range(10000)]})
    counts = {}
    ids = {}
    for split in ("trainfull", "valfull", "testfull", "test1kA"):
        records = read("msrvtt", tmp_path, split)
        counts[split] = len(records)
        ids[split] = [r.video_id for r in records]
        assert len(set(ids[split])) == len(records)
    assert counts == {"trainfull": 6513, "valfull": 497, "testfull": 2990, "test1kA": 1000}
    # the full split is videos 0-6512 / 6513-7009 / 7010-9999, and 1k-A is drawn from its test part
    assert ids["trainfull"][0] == "video0" and ids["valfull"][0] == "video6513" and ids["testfull"][-1] == "video9999"
    assert set(ids["test1kA"]) <= set(ids["testfull"])
    first = read("msrvtt", tmp_path, "test1kA")[0]
    assert first == VideoRecord("video9770", captions=["a person is connecting something to system"], split="test1kA")
    assert read("msrvtt", tmp_path, "valfull")[0].captions == ["caption 0 of 6513", "caption 1 of 6513"]


# ----------------------------------------------------------------------------------------------
# MSVD


MSVD_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating", "a", "peanut"], ["a", "chipmunk", "eats"]],
    "-7KMZQEsJW4_205_208": [["a", "man", "is", "cutting", "a", "bottle"]],
    "zzit5b_-ukg_5_20": [["a", "man", "rides", "a", "bike"], ["someone", "is", "riding"], ["a", "biker"]],
}


def msvd_files(root: Path, protocol=pickle.HIGHEST_PROTOCOL):
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(MSVD_CAPTIONS, protocol=protocol))
    write(root, "train_list.txt", "zzit5b_-ukg_5_20\n-4wsuPCjDBc_5_15\n")
    write(root, "val_list.txt", "-7KMZQEsJW4_205_208\n")
    write(root, "test_list.txt", "-4wsuPCjDBc_5_15\n\n-7KMZQEsJW4_205_208\n")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_msvd_splits_join_the_token_lists_of_every_caption(tmp_path, protocol):
    msvd_files(tmp_path, protocol)
    assert read("msvd", tmp_path, "train") == [
        VideoRecord("zzit5b_-ukg_5_20", captions=["a man rides a bike", "someone is riding", "a biker"],
                    split="train"),
        VideoRecord("-4wsuPCjDBc_5_15", captions=["a squirrel is eating a peanut", "a chipmunk eats"],
                    split="train"),
    ]
    assert [r.video_id for r in read("msvd", tmp_path, "test")] == ["-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]
    assert read("msvd", tmp_path, "val") == [
        VideoRecord("-7KMZQEsJW4_205_208", captions=["a man is cutting a bottle"], split="val")]


def test_msvd_reads_a_python2_pickle_of_byte_strings(tmp_path):
    # PROTO 2, {}, 'vid' -> [['a', 'bb']] with py2 SHORT_BINSTRING strings: what a Python 2 pickle.dump writes
    (tmp_path / "raw-captions.pkl").write_bytes(b"\x80\x02}U\x03vid]]U\x01aaU\x02bbaas.")
    assert load_raw_captions(tmp_path / "raw-captions.pkl") == {"vid": [["a", "bb"]]}


class _Payload:
    """Pickles as a call of os.system: loading it with a plain unpickler would run the shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_msvd_refuses_a_pickle_that_runs_code_and_runs_nothing(tmp_path, protocol):
    msvd_files(tmp_path)
    marker = tmp_path / "pwned"
    hostile = {**MSVD_CAPTIONS, "-7KMZQEsJW4_205_208": [_Payload(f"touch {marker}")]}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(hostile, protocol=protocol))
    # the payload is real: the standard unpickler would run it (not done here), and names the global it needs
    assert b"system" in (tmp_path / "raw-captions.pkl").read_bytes()
    with pytest.raises(AnnotationError, match=rf"{tmp_path / 'raw-captions.pkl'}: refused: the pickle asks for the "
                                              r"global (posix|nt|os)\.system.*Nothing in it was run"):
        read("msvd", tmp_path, "val")
    assert not marker.exists()


def test_msvd_refuses_any_global_even_a_builtin(tmp_path):
    p = tmp_path / "raw-captions.pkl"
    p.write_bytes(pickle.dumps({"v": [["a"]], "s": {1, 2}}, protocol=2))  # protocol 2 pickles a set as __builtin__.set
    with pytest.raises(AnnotationError, match=r"refused: the pickle asks for the global (__builtin__|builtins)\.set"):
        load_raw_captions(p)


def test_msvd_errors_name_the_file_and_the_entry(tmp_path):
    msvd_files(tmp_path)
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"-7KMZQEsJW4_205_208": ["a man is cutting"]}))
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: video '-7KMZQEsJW4_205_208': caption 0: expected "
                                              r"a list of string tokens"):
        read("msvd", tmp_path, "val")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"-7KMZQEsJW4_205_208": [["a"]]}))
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: no captions for video '-4wsuPCjDBc_5_15', which "
                                              r"test_list.txt lists"):
        read("msvd", tmp_path, "test")
    (tmp_path / "raw-captions.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(AnnotationError, match=r"raw-captions.pkl: not a readable pickle"):
        read("msvd", tmp_path, "val")
    os.remove(tmp_path / "val_list.txt")
    with pytest.raises(AnnotationError, match=r"val_list.txt: not found; split 'val' of msvd needs val_list.txt; "
                                              r"unpack msvd_data.zip"):
        read("msvd", tmp_path, "val")


# ----------------------------------------------------------------------------------------------
# LSMDC


def lsmdc_line(clip, sentence):
    return f"{clip}\t00.00.01.000\t00.00.03.000\t00.00.00.900\t00.00.03.100\t{sentence}\n"


def test_lsmdc_repeated_clip_ids_make_one_record_with_every_sentence(tmp_path):
    a = "0001_American_Beauty_00.00.51.926-00.00.54.129"
    b = "0001_American_Beauty_00.00.56.224-00.00.59.210"
    write(tmp_path, "LSMDC16_annos_training.csv",
          lsmdc_line(a, "SOMEONE opens the door.") + lsmdc_line(b, "He looks up.")
          + lsmdc_line(a, "She steps inside.") + "\n")
    write(tmp_path, "LSMDC16_annos_val.csv", lsmdc_line(b, "A man looks up."))
    write(tmp_path, "LSMDC16_challenge_1000_publictect.csv",
          lsmdc_line("3001_21_JUMP_STREET_00.00.07.150-00.00.10.740", "Two cops ride bikes."))
    assert read("lsmdc", tmp_path, "train") == [
        VideoRecord(a, file_id=a, captions=["SOMEONE opens the door.", "She steps inside."], split="train"),
        VideoRecord(b, file_id=b, captions=["He looks up."], split="train"),
    ]
    assert [r.captions for r in read("lsmdc", tmp_path, "val")] == [["A man looks up."]]
    (rec,) = read("lsmdc", tmp_path, "test")
    assert rec.stem == "3001_21_JUMP_STREET_00.00.07.150-00.00.10.740" and rec.split == "test"


def test_lsmdc_malformed_line_names_the_file_and_line(tmp_path):
    write(tmp_path, "LSMDC16_annos_val.csv", lsmdc_line("c1", "ok") + "c2\t00.00.01.000\tno sentence\n")
    with pytest.raises(AnnotationError, match=r"LSMDC16_annos_val.csv: line 2: expected 6 tab-separated fields "
                                              r"\(clip id, .*\), got 3"):
        read("lsmdc", tmp_path, "val")
    with pytest.raises(AnnotationError, match=r"LSMDC16_challenge_1000_publictect.csv: not found; split 'test'"):
        read("lsmdc", tmp_path, "test")


# ----------------------------------------------------------------------------------------------
# ActivityNet


ANET_TRAIN = {
    "v_QOlSCBRmfWY": {"duration": 82.73,
                      "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 79.42]],
                      "sentences": ["A young woman is seen standing in a room.",
                                    " She then begins to dance.", " She continues spinning around."]},
    "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[0, 15.5], [12.1, 61.72]],
                      "sentences": ["A man stands on a beach.", " He throws a frisbee."]},
}


def test_activitynet_is_one_paragraph_per_video_with_timed_sentences(tmp_path):
    write_json(tmp_path, "train.json", ANET_TRAIN)
    write_json(tmp_path, "val_1.json", {"v_bXdq2zI1Ms0": {"duration": 73.1, "timestamps": [[0.0, 73.1]],
                                                          "sentences": ["Three men play polo."]}})
    first, second = read("activitynet", tmp_path, "train")
    assert first == VideoRecord(
        "v_QOlSCBRmfWY", file_id="QOlSCBRmfWY", split="train",
        captions=["A young woman is seen standing in a room.  She then begins to dance.  She continues spinning "
                  "around."],
        sentences=[Segment(0.83, 19.86, "A young woman is seen standing in a room."),
                   Segment(17.37, 60.81, " She then begins to dance."),
                   Segment(56.26, 79.42, " She continues spinning around.")],
        meta={"duration": 82.73})
    assert first.span is None and second.stem == "ehGHCYKzyZ8" and len(second.sentences) == 2
    (val,) = read("activitynet", tmp_path, "val1")
    assert (val.video_id, val.captions, val.split) == ("v_bXdq2zI1Ms0", ["Three men play polo."], "val1")

    # train_ids.json, when present, selects the videos and gives their order (as CLIP4Clip reads it)
    write_json(tmp_path, "train_ids.json", ["v_ehGHCYKzyZ8"])
    assert [r.video_id for r in read("activitynet", tmp_path, "train")] == ["v_ehGHCYKzyZ8"]
    write_json(tmp_path, "train_ids.json", ["v_ehGHCYKzyZ8", "v_QOlSCBRmfWY"])
    assert [r.video_id for r in read("activitynet", tmp_path, "train")] == ["v_ehGHCYKzyZ8", "v_QOlSCBRmfWY"]
    src = open_source("activitynet", SimpleNamespace(annotations=str(tmp_path), split="train"))
    assert list(src.describe()["files"]) == [str(tmp_path / "train.json"), str(tmp_path / "train_ids.json")]


def test_activitynet_errors_name_the_file_and_the_video(tmp_path):
    bad = json.loads(json.dumps(ANET_TRAIN))
    bad["v_ehGHCYKzyZ8"]["timestamps"] = [[0, 15.5]]
    write_json(tmp_path, "train.json", bad)
    with pytest.raises(AnnotationError, match=r"train.json: video 'v_ehGHCYKzyZ8': timestamps must be a list of "
                                              r"\[start, end\] pairs, one per sentence \(2 sentences\)"):
        read("activitynet", tmp_path, "train")
    bad["v_ehGHCYKzyZ8"]["timestamps"] = [[0, 15.5], [30, 12]]
    write_json(tmp_path, "train.json", bad)
    with pytest.raises(AnnotationError, match=r"video 'v_ehGHCYKzyZ8': timestamps\[1\]: end 12.0 is before start"):
        read("activitynet", tmp_path, "train")
    del bad["v_ehGHCYKzyZ8"]["duration"]
    write_json(tmp_path, "train.json", bad)
    with pytest.raises(AnnotationError, match=r"video 'v_ehGHCYKzyZ8': missing key\(s\) duration"):
        read("activitynet", tmp_path, "train")
    write_json(tmp_path, "train.json", ANET_TRAIN)
    write_json(tmp_path, "train_ids.json", ["v_QOlSCBRmfWY", "v_missing"])
    with pytest.raises(AnnotationError, match=r"train_ids.json: 1 listed video\(s\) have no entry in train.json "
                                              r"\(first: 'v_missing'\).*remove train_ids.json"):
        read("activitynet", tmp_path, "train")
    with pytest.raises(AnnotationError, match=r"val_1.json: not found; split 'val1' of activitynet needs val_1.json"):
        read("activitynet", tmp_path, "val1")


# ----------------------------------------------------------------------------------------------
# DiDeMo


def didemo_item(video, description, times, annotation_id):
    return {"num_segments": 6, "description": description, "times": times, "video": video,
            "dl_link": "https://www.flickr.com/video_download.gne?id=0", "annotation_id": annotation_id}


DIDEMO_TEST = [
    didemo_item("10015567@N08_3655084291_d8b58466fa.mov", "a girl in a red coat walks away",
                [[0, 0], [0, 1], [0, 0], [0, 0]], 1),
    didemo_item("21006049@N06_2466357830_9007c17cbd.3gp", "the girl throws her towel down",
                [[2, 2], [2, 2], [0, 0], [2, 2]], 2),
    didemo_item("10015567@N08_3655084291_d8b58466fa.mov", "the camera pans left", [[4, 5], [5, 5], [4, 5], [5, 5]],
                3),
]


def test_didemo_is_one_paragraph_per_video_over_its_first_30_s(tmp_path):
    write_json(tmp_path, "test_data.json", DIDEMO_TEST)
    first, second = read("didemo", tmp_path, "test")
    assert first == VideoRecord(
        "10015567@N08_3655084291_d8b58466fa.mov", file_id="10015567@N08_3655084291_d8b58466fa", split="test",
        captions=["a girl in a red coat walks away the camera pans left"], span=(0.0, 30.0),
        # start = mean(start index) x 5; end = (mean(end index) + 1) x 5
        sentences=[Segment(0.0, 6.25, "a girl in a red coat walks away"), Segment(22.5, 30.0, "the camera pans left")])
    assert second.sentences == [Segment(7.5, 12.5, "the girl throws her towel down")]
    assert second.stem == "21006049@N06_2466357830_9007c17cbd" and second.captions == ["the girl throws her towel down"]

    # the list, when present, keeps only its videos; the data file's order stays
    write(tmp_path, "test_list.txt", "21006049@N06_2466357830_9007c17cbd.3gp\n")
    assert [r.video_id for r in read("didemo", tmp_path, "test")] == ["21006049@N06_2466357830_9007c17cbd.3gp"]
    write(tmp_path, "test_list.txt", "nope.mp4\n")
    with pytest.raises(AnnotationError, match=r"test_list.txt: 1 listed video\(s\) have no description in "
                                              r"test_data.json \(first: 'nope.mp4'\)"):
        read("didemo", tmp_path, "test")


def test_didemo_malformed_item_names_the_file_and_item(tmp_path):
    items = DIDEMO_TEST + [didemo_item("x.mp4", "a dog", [[1, "two"]], 4)]
    write_json(tmp_path, "val_data.json", items)
    with pytest.raises(AnnotationError, match=r"val_data.json: item 3 \(video 'x.mp4'\): times\[0\] must be a "
                                              r"non-negative number, got 'two'"):
        read("didemo", tmp_path, "val")
    write_json(tmp_path, "val_data.json", DIDEMO_TEST + [{"video": "x.mp4", "times": [[0, 0]]}])
    with pytest.raises(AnnotationError, match=r"item 3 \(video 'x.mp4'\): description must be a string"):
        read("didemo", tmp_path, "val")
    write_json(tmp_path, "val_data.json", {"video": "x.mp4"})
    with pytest.raises(AnnotationError, match=r"val_data.json: the top level must be a list"):
        read("didemo", tmp_path, "val")
    with pytest.raises(AnnotationError, match=r"train_data.json: not found; split 'train' of didemo.*Localizing"):
        read("didemo", tmp_path, "train")


# ----------------------------------------------------------------------------------------------
# VATEX


def test_vatex_splits_hold_the_english_captions(tmp_path):
    caps = {f"Ptf_2VRj-V0_00012{i}_00013{i}": {"enCap": [f"caption {k} of {i}" for k in range(10)],
                                                "chCap": ["一个人"] * 10} for i in range(5)}
    write_json(tmp_path, "vatex_data.json", caps)
    ids = list(caps)
    write(tmp_path, "train_list.txt", f"{ids[0]}\n{ids[1]}\n")
    write(tmp_path, "val_list.txt", f"{ids[2]}\n")
    write(tmp_path, "test_list.txt", f"{ids[3]}\n")
    write(tmp_path, "test1k5_sec_list.txt", f"{ids[4]}\n{ids[2]}\n")
    train = read("vatex", tmp_path, "train")
    assert [r.video_id for r in train] == ids[:2]
    assert train[0] == VideoRecord(ids[0], captions=[f"caption {k} of 0" for k in range(10)], split="train")
    assert [(r.video_id, r.split) for r in read("vatex", tmp_path, "test1k5")] == [(ids[4], "test1k5"),
                                                                                    (ids[2], "test1k5")]
    assert [r.video_id for r in read("vatex", tmp_path, "val")] == [ids[2]]
    assert [r.video_id for r in read("vatex", tmp_path, "test")] == [ids[3]]

    del caps[ids[3]]["enCap"]
    write_json(tmp_path, "vatex_data.json", caps)
    with pytest.raises(AnnotationError, match=rf"vatex_data.json: video '{ids[3]}': expected an object with an "
                                              r"\"enCap\" caption list"):
        read("vatex", tmp_path, "test")
    os.remove(tmp_path / "test1k5_sec_list.txt")
    with pytest.raises(AnnotationError, match=r"test1k5_sec_list.txt: not found; split 'test1k5' of vatex"):
        read("vatex", tmp_path, "test1k5")


# ----------------------------------------------------------------------------------------------
# describe()


def test_describe_lists_the_files_of_the_split_with_size_and_mtime(tmp_path):
    msvd_files(tmp_path)
    src = open_source("msvd", SimpleNamespace(annotations=str(tmp_path), split="val"))
    d = src.describe()
    assert (d["source"], d["split"], d["annotations"]) == ("msvd", "val", str(tmp_path))
    assert list(d["files"]) == [str(tmp_path / "val_list.txt"), str(tmp_path / "raw-captions.pkl")]
    st = (tmp_path / "raw-captions.pkl").stat()
    assert d["files"][str(tmp_path / "raw-captions.pkl")] == {"size": st.st_size, "mtime": st.st_mtime}
