"""LSMDC 2016: movie clips with their sentences; test = the 1,000-clip challenge set.

    ptrain shard source=lsmdc annotations=DIR split=test ...

Files (from the LSMDC / MPII Movie Description site, after its access form): ``LSMDC16_annos_training.csv`` (train),
``LSMDC16_annos_val.csv`` (val), ``LSMDC16_challenge_1000_publictect.csv`` (test). Despite the name they are
tab-separated, without a header, six fields a line: clip id, start/end aligned, start/end extracted, sentence.

A clip id can repeat with several sentences (train and val): one record per clip, in first-appearance order, with
all its sentences in file order. The clip file is ``<movie>/<clip id>.avi``: ``file_id`` is the clip id, dots
included (only the file extension is stripped when matching), while the sample key sanitises the dots.
"""

from __future__ import annotations

from sharding.sources import VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, group_in_order, read_tsv

FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
LAYOUT = "clip id, start aligned, end aligned, start extracted, end extracted, sentence"


class LSMDC(BenchmarkSource):
    name = "lsmdc"
    splits = {s: (f,) for s, f in FILES.items()}
    download = ("download the LSMDC 2016 annotation files from the LSMDC / MPII Movie Description site (access is "
                "granted by form) and put them in one directory")

    def _read(self) -> list[VideoRecord]:
        p = self.path(FILES[self.split])
        pairs = []
        for line, fields in read_tsv(p, 6, LAYOUT):
            clip_id, sentence = fields[0].strip(), fields[5]
            if not clip_id:
                raise AnnotationError(f"{p}: line {line}: empty clip id")
            pairs.append((clip_id, sentence))
        return [VideoRecord(video_id=clip, file_id=clip, captions=texts, split=self.split)
                for clip, texts in group_in_order(pairs).items()]
