"""VATEX (English): ~10 captions per 10-s clip; HGR's val/test split and CLIP2Video's random 1,500-video test.

    ptrain shard source=vatex annotations=DIR split=test1k5 ...

Files (CLIP2Video's ``data/vatex_data/`` plus the caption file of its README): ``vatex_data.json``
(``{video_id: {"enCap": [caption, ...], ...}}``, ids like ``Ptf_2VRj-V0_000122_000132``), ``train_list.txt``
(25,991), ``val_list.txt`` and ``test_list.txt`` (1,500 each, HGR's split) and ``test1k5_sec_list.txt`` (1,500,
the random split behind the CLIP2Video paper's numbers). A record per listed video (list order) holds its English
captions in file order; the Chinese ones are not read.
"""

from __future__ import annotations

from sharding.sources import VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, read_id_list, read_json, text_list

DATA = "vatex_data.json"
LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt", "test1k5": "test1k5_sec_list.txt"}


class VATEX(BenchmarkSource):
    name = "vatex"
    splits = {s: (f, DATA) for s, f in LISTS.items()}
    download = ("the split lists and vatex_data.json are those of CLIP2Video's data/vatex_data/ (see its README; "
                "vatex_data.json holds the VATEX captions per video)")

    def _read(self) -> list[VideoRecord]:
        list_file = self.path(LISTS[self.split])
        ids = read_id_list(list_file)
        p = self.path(DATA)
        data = read_json(p, dict, '{video_id: {"enCap": [caption, ...]}}')
        out = []
        for vid in ids:
            entry = data.get(vid)
            if entry is None:
                raise AnnotationError(f"{p}: no captions for video {vid!r}, which {list_file.name} lists; are both "
                                      "files from the same release?")
            if not isinstance(entry, dict) or "enCap" not in entry:
                raise AnnotationError(f"{p}: video {vid!r}: expected an object with an \"enCap\" caption list")
            captions = text_list(entry["enCap"], f"{p}: video {vid!r}", "enCap")
            out.append(VideoRecord(video_id=vid, captions=list(captions), split=self.split))
        return out
