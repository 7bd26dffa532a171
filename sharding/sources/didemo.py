"""DiDeMo as paragraph retrieval: one record per video, its moment descriptions joined into one paragraph, the
video's first 30 s as the clip.

    ptrain shard source=didemo annotations=DIR split=test ...

Files (LocalizingMoments' ``data/``; CLIP4Clip's README points to it): ``{train,val,test}_data.json``, a list of
``{"video": "<flickr id>.<ext>", "description", "times": [[start, end] per annotator], ...}`` with times in 5-second
segment indices (0..5, end inclusive); optionally ``{train,val,test}_list.txt`` (video file names, extension
included), which, when present, keeps only the listed videos, as in CLIP4Clip.

A record: ``video_id`` = the ``video`` field as spelled (with its extension); ``file_id`` = that name without the
extension (videos are matched by stem, so a transcoded ``.mp4`` is found too); ``captions`` = [the descriptions
joined with single spaces in file order, as CLIP4Clip joins them]; ``sentences`` = each description with the mean of
its annotators' times in seconds: start = mean(start index) x 5, end = (mean(end index) + 1) x 5 (CLIP4Clip's
formula, which it computes and then discards); ``span`` = (0, 30): the annotated window (LocalizingMoments: videos
were truncated to 30 s for annotation). CLIP4Clip passes end 31 to a per-second loop that includes its end, so it
reads the frames at 0..31 s; 30 keeps the sampled frames inside the annotated window. Videos are in
first-appearance order of the data JSON.
"""

from __future__ import annotations

from sharding.sources import Segment, VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, number, read_id_list, read_json

SPAN = (0.0, 30.0)  # seconds: the annotated part of every DiDeMo video
SEGMENT_SECONDS = 5.0  # one DiDeMo time index


class DiDeMo(BenchmarkSource):
    name = "didemo"
    splits = {s: (f"{s}_data.json",) for s in ("train", "val", "test")}
    optional = {s: (f"{s}_list.txt",) for s in ("train", "val", "test")}
    download = ("download {train,val,test}_data.json from LocalizingMoments (github.com/LisaAnne/LocalizingMoments, "
                "data/) and, optionally, CLIP4Clip's {train,val,test}_list.txt")

    def _read(self) -> list[VideoRecord]:
        p = self.path(f"{self.split}_data.json")
        items = read_json(p, list, 'a list of {"video", "description", "times"} objects')
        by_video: dict[str, list[Segment]] = {}
        for i, item in enumerate(items):
            vid, sentence = self._moment(p, i, item)
            by_video.setdefault(vid, []).append(sentence)
        videos = list(by_video)
        list_path = self.optional_path(f"{self.split}_list.txt")
        if list_path is not None:
            listed = read_id_list(list_path)
            unknown = [v for v in listed if v not in by_video]
            if unknown:
                raise AnnotationError(f"{list_path}: {len(unknown)} listed video(s) have no description in {p.name} "
                                      f"(first: {unknown[0]!r}); use the two files of the same release, or remove "
                                      f"{list_path.name} to read every video of {p.name}")
            keep = set(listed)
            videos = [v for v in videos if v in keep]
        return [VideoRecord(video_id=v, file_id=v.rsplit(".", 1)[0] if "." in v else "",
                            captions=[" ".join(s.text for s in by_video[v])], split=self.split, span=SPAN,
                            sentences=by_video[v])
                for v in videos]

    @staticmethod
    def _moment(path, i: int, item) -> tuple[str, Segment]:
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise AnnotationError(f"{where}: expected an object with video, description and times")
        vid, text, times = item.get("video"), item.get("description"), item.get("times")
        if not isinstance(vid, str) or not vid:
            raise AnnotationError(f"{where}: video must be a non-empty string (the file name), got {vid!r}")
        where = f"{where} (video {vid!r})"
        if not isinstance(text, str):
            raise AnnotationError(f"{where}: description must be a string, got {text!r}")
        if not isinstance(times, list) or not times:
            raise AnnotationError(f"{where}: times must be a non-empty list of [start, end] segment indices")
        starts, ends = [], []
        for j, pair in enumerate(times):
            if not isinstance(pair, list) or len(pair) != 2:
                raise AnnotationError(f"{where}: times[{j}] must be [start, end], got {pair!r}")
            s, e = (number(t, where, f"times[{j}]") for t in pair)
            if e < s:
                raise AnnotationError(f"{where}: times[{j}]: end index {e:g} is before start index {s:g}")
            starts.append(s)
            ends.append(e)
        start = sum(starts) / len(starts) * SEGMENT_SECONDS
        end = (sum(ends) / len(ends) + 1) * SEGMENT_SECONDS
        return vid, Segment(start, end, text)
