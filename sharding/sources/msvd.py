"""MSVD: 1,200 / 100 / 670 videos, ~40 pre-tokenised captions each, read from ``raw-captions.pkl`` without running it.

    ptrain shard source=msvd annotations=DIR split=test ...

Files (CLIP4Clip's ``msvd_data.zip``): ``raw-captions.pkl`` (``{video_id: [[token, ...], ...]}``) and
``{train,val,test}_list.txt`` (one video id per line, e.g. ``-4wsuPCjDBc_5_15``). A record per listed video (list
order) holds every caption of that video, each token list joined with spaces as the reference loaders do.

The pickle is the one non-JSON/CSV annotation file of the project. It is read by ``load_raw_captions``, whose
unpickler refuses every global: the builtin containers and scalars that file holds (dict, list, str) are built by
pickle opcodes that need none, while anything that could run code (a class, a function such as ``os.system``, a
``__reduce__`` payload) has to be looked up as a global first, and is refused with an error before it exists.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from sharding.sources import VideoRecord
from sharding.sources.benchmark import AnnotationError, BenchmarkSource, read_id_list

CAPTIONS = "raw-captions.pkl"


class _NoGlobals(pickle.Unpickler):
    """An unpickler that builds only what pickle encodes without globals: dict, list, tuple, str, bytes, int, float,
    bool and None."""

    def __init__(self, file, path: Path):
        # Python 2 pickles hold byte strings; decode them as UTF-8 text rather than refusing them
        super().__init__(file, encoding="utf-8")
        self.path = path

    def find_class(self, module: str, name: str):
        raise AnnotationError(
            f"{self.path}: refused: the pickle asks for the global {module}.{name}; raw-captions.pkl holds only "
            "builtin containers and strings ({video_id: [[token, ...], ...]}), so this file is not the one the "
            "benchmark ships. Nothing in it was run; replace it with the released raw-captions.pkl")

    def persistent_load(self, pid):
        raise AnnotationError(f"{self.path}: refused: the pickle refers to a persistent object ({str(pid)[:40]}); "
                              "raw-captions.pkl holds only builtin containers and strings")


def load_raw_captions(path: str | Path) -> dict[str, list[list[str]]]:
    """``{video_id: [[token, ...], ...]}`` from an MSVD ``raw-captions.pkl``, validated; never runs code."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = _NoGlobals(f, p).load()
    except AnnotationError:
        raise
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{p}: a string in the pickle is not UTF-8 ({e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, OverflowError,
            MemoryError, AttributeError) as e:
        raise AnnotationError(f"{p}: not a readable pickle ({type(e).__name__}: {e}); expected MSVD's "
                              "raw-captions.pkl") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{p}: expected a dict {{video_id: [[token, ...], ...]}}, got {type(data).__name__}")
    for vid, caps in data.items():
        if not isinstance(vid, str):
            raise AnnotationError(f"{p}: key {vid!r}: video ids must be strings")
        if not isinstance(caps, list):
            raise AnnotationError(f"{p}: video {vid!r}: expected a list of token lists, got {type(caps).__name__}")
        for i, tokens in enumerate(caps):
            if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
                raise AnnotationError(f"{p}: video {vid!r}: caption {i}: expected a list of string tokens, "
                                      f"got {str(tokens)[:80]}")
    return data


class MSVD(BenchmarkSource):
    name = "msvd"
    splits = {s: (f"{s}_list.txt", CAPTIONS) for s in ("train", "val", "test")}
    download = "unpack msvd_data.zip from the CLIP4Clip release (raw-captions.pkl and the {train,val,test}_list.txt)"

    def _read(self) -> list[VideoRecord]:
        list_file = self.path(f"{self.split}_list.txt")
        ids = read_id_list(list_file)
        captions = load_raw_captions(self.path(CAPTIONS))
        out = []
        for vid in ids:
            if vid not in captions:
                raise AnnotationError(f"{self.path(CAPTIONS)}: no captions for video {vid!r}, which {list_file.name} "
                                      "lists; are both files from the same release?")
            out.append(VideoRecord(video_id=vid, captions=[" ".join(t) for t in captions[vid]], split=self.split))
        return out
