"""ActivityNet Captions as paragraph retrieval: one record per video, its sentences joined into one paragraph.

    ptrain shard source=activitynet annotations=DIR split=val1 ...

Files (the ActivityNet Captions release; CLIP4Clip's README points to it): ``train.json`` (split ``train``) and
``val_1.json`` (split ``val1``, the test set of the papers: 4,917 videos), each ``{"v_<youtube id>": {"duration",
"timestamps": [[start, end], ...], "sentences": [...]}}`` in seconds; optionally ``train_ids.json`` /
``val_ids.json`` (a list of ``v_<youtube id>``), which, when present, select the videos and give their order, as in
CLIP4Clip. Without them every video of the JSON is read, in its order.

A record: ``video_id`` = ``v_<youtube id>``; ``file_id`` = the YouTube id (video files are named without ``v_``);
``captions`` = [the sentences joined with single spaces, exactly as CLIP4Clip joins them (ActivityNet sentences
often start with a space, so the paragraph can hold double spaces; the tokenizer collapses them)]; ``sentences``
= the timed sentences; ``span`` = None (the whole video; CLIP4Clip reads [0, ceil(duration)]);
``meta`` = ``{"duration": seconds}``.
"""

from __future__ import annotations

from sharding.sources import Segment, VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, number, read_json, text_list

FILES = {"train": ("train.json", "train_ids.json"), "val1": ("val_1.json", "val_ids.json")}
SHAPE = '{"v_<id>": {"duration": s, "timestamps": [[start, end], ...], "sentences": [...]}}'


class ActivityNet(BenchmarkSource):
    name = "activitynet"
    splits = {s: (captions,) for s, (captions, _) in FILES.items()}
    optional = {s: (ids,) for s, (_, ids) in FILES.items()}
    download = ("download the ActivityNet Captions annotation release (train.json, val_1.json) and, optionally, "
                "CLIP4Clip's train_ids.json / val_ids.json")

    def _read(self) -> list[VideoRecord]:
        captions_file, ids_file = FILES[self.split]
        p = self.path(captions_file)
        data = read_json(p, dict, SHAPE)
        ids = list(data)
        id_path = self.optional_path(ids_file)
        if id_path is not None:
            listed = read_json(id_path, list, 'a list of "v_<youtube id>" strings')
            ids = list(dict.fromkeys(text_list(listed, str(id_path), "the video ids")))
            unknown = [v for v in ids if v not in data]
            if unknown:
                raise AnnotationError(f"{id_path}: {len(unknown)} listed video(s) have no entry in {captions_file} "
                                      f"(first: {unknown[0]!r}); use the two files of the same release, or remove "
                                      f"{ids_file} to read every video of {captions_file}")
        return [self._record(p.name, vid, data[vid]) for vid in ids]

    def _record(self, filename: str, vid: str, entry) -> VideoRecord:
        where = f"{self.root / filename}: video {vid!r}"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where}: expected an object with duration, timestamps and sentences")
        missing = [k for k in ("duration", "timestamps", "sentences") if k not in entry]
        if missing:
            raise AnnotationError(f"{where}: missing key(s) {', '.join(missing)}")
        duration = number(entry["duration"], where, "duration")
        sentences = text_list(entry["sentences"], where, "sentences")
        if not sentences:
            raise AnnotationError(f"{where}: no sentences, so no paragraph to retrieve it by")
        stamps = entry["timestamps"]
        if not isinstance(stamps, list) or len(stamps) != len(sentences):
            raise AnnotationError(f"{where}: timestamps must be a list of [start, end] pairs, one per sentence "
                                  f"({len(sentences)} sentences)")
        timed = []
        for i, (pair, text) in enumerate(zip(stamps, sentences)):
            if not isinstance(pair, list) or len(pair) != 2:
                raise AnnotationError(f"{where}: timestamps[{i}] must be [start, end], got {pair!r}")
            start, end = (number(t, where, f"timestamps[{i}]") for t in pair)
            if end < start:
                raise AnnotationError(f"{where}: timestamps[{i}]: end {end} is before start {start}")
            timed.append(Segment(start, end, text))
        return VideoRecord(video_id=vid, file_id=vid[2:] if vid.startswith("v_") else "",
                           captions=[" ".join(sentences)], split=self.split, sentences=timed,
                           meta={"duration": duration})
