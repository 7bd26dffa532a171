"""MSR-VTT: the 9k / 7k training lists, the 1k-A test (JSFUSION) and the full 6,513 / 497 / 2,990 split.

    ptrain shard source=msrvtt annotations=DIR split=train9k ...

Files (CLIP4Clip's ``msrvtt_data.zip``; the ``*.full.csv`` lists ship in CLIP2Video's ``data/msrvtt_data/``):

- ``MSRVTT_data.json``: ``{"videos": [{"video_id", "category", "url", ...}], "sentences": [{"video_id", "caption",
  "sen_id"}]}``, 20 captions per video;
- ``MSRVTT_train.9k.csv``, ``MSRVTT_train.7k.csv``, ``MSRVTT_{train,val,test}.full.csv``: a ``video_id`` column;
- ``MSRVTT_JSFUSION_test.csv``: ``key,vid_key,video_id,sentence``, one row per test video (1,000).

A list split yields one record per listed video (list order) with every caption of ``MSRVTT_data.json`` for it, in
that file's order, and its category in ``meta``. ``test1kA`` reads only the JSFUSION file: its one sentence per video
is the caption, as in CLIP4Clip's evaluation.
"""

from __future__ import annotations

from sharding.sources import VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, group_in_order, read_csv, read_json

DATA = "MSRVTT_data.json"
JSFUSION = "MSRVTT_JSFUSION_test.csv"
LISTS = {  # split -> its video list (test1kA has none: the JSFUSION file is its list and its captions)
    "train9k": "MSRVTT_train.9k.csv",
    "train7k": "MSRVTT_train.7k.csv",
    "trainfull": "MSRVTT_train.full.csv",
    "valfull": "MSRVTT_val.full.csv",
    "testfull": "MSRVTT_test.full.csv",
}


class MSRVTT(BenchmarkSource):
    name = "msrvtt"
    splits = {
        "train9k": (LISTS["train9k"], DATA),
        "train7k": (LISTS["train7k"], DATA),
        "test1kA": (JSFUSION,),
        "trainfull": (LISTS["trainfull"], DATA),
        "valfull": (LISTS["valfull"], DATA),
        "testfull": (LISTS["testfull"], DATA),
    }
    download = ("unpack msrvtt_data.zip from the CLIP4Clip release (MSRVTT_data.json, the 9k/7k and JSFUSION CSVs); "
                "the *.full.csv lists are in CLIP2Video's data/msrvtt_data/")

    def _read(self) -> list[VideoRecord]:
        if self.split == "test1kA":
            return self._read_jsfusion()
        listed = list(dict.fromkeys(row["video_id"] for _, row in read_csv(self.path(LISTS[self.split]),
                                                                             ("video_id",))))
        captions, category = self._read_data()
        out = []
        for vid in listed:
            if vid not in captions:
                raise AnnotationError(f"{self.path(DATA)}: no sentence for video {vid!r}, which "
                                      f"{LISTS[self.split]} lists; are both files from the same release?")
            meta = {"category": category[vid]} if vid in category else {}
            out.append(VideoRecord(video_id=vid, captions=captions[vid], split=self.split, meta=meta))
        return out

    def _read_jsfusion(self) -> list[VideoRecord]:
        p = self.path(JSFUSION)
        pairs = []
        for line, row in read_csv(p, ("video_id", "sentence")):
            if not row["video_id"]:
                raise AnnotationError(f"{p}: line {line}: empty video_id")
            pairs.append((row["video_id"], row["sentence"]))
        return [VideoRecord(video_id=vid, captions=texts, split=self.split)
                for vid, texts in group_in_order(pairs).items()]

    def _read_data(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        """``({video_id: [caption, ...]}, {video_id: category})`` from MSRVTT_data.json."""
        p = self.path(DATA)
        data = read_json(p, dict, 'an object with "videos" and "sentences" lists')
        sentences = data.get("sentences")
        if not isinstance(sentences, list):
            raise AnnotationError(f"{p}: needs a \"sentences\" list of {{video_id, caption}} objects")
        pairs = []
        for i, s in enumerate(sentences):
            if not (isinstance(s, dict) and isinstance(s.get("video_id"), str) and isinstance(s.get("caption"), str)):
                raise AnnotationError(f"{p}: sentences[{i}]: expected an object with string video_id and caption, "
                                      f"got {str(s)[:80]}")
            pairs.append((s["video_id"], s["caption"]))
        category = {}
        for v in data.get("videos") or []:
            # the category is a nicety: an entry without one is kept without it
            if isinstance(v, dict) and isinstance(v.get("video_id"), str) and isinstance(v.get("category"), int):
                category[v["video_id"]] = v["category"]
        return group_in_order(pairs), category
