"""Video decoding for `ptrain shard`: every clip of a video in one forward pass, frames picked by timestamp.

    from sharding.decode.extract import extract_clips
    info, results = extract_clips(path, clips, frame_size=224, ...)      # in-process
    from sharding.decode.worker import DecodeWorker
    worker = DecodeWorker(); worker.run(path, clips, ..., timeout=120)  # in a child process that is killed on hang

``clips`` is a list of ``(start, end, targets)``; each result is a list of ``(pts_seconds, jpeg_bytes)`` per target,
or an ``ExtractError`` for that clip (e.g. ``span_beyond_end``). Whole-video failures raise ``ExtractError`` with a
class: missing, empty, corrupt, truncated, no_video_stream, unsupported, timeout, decode_error.

Modules:

- ``extract``: ``extract_clips``, the one entry point: picks the decoder, falls back to the other one, and judges
  each clip against the video's end;
- ``pyav``: the PyAV decoder (bundled FFmpeg; the default) and the home of every ``import av`` in ptrain, video
  writing included (the sample corpus, the benchmarks);
- ``decord``: the decord decoder (the fallback), the one module that imports decord;
- ``worker``: ``DecodeWorker``, a killable child process around ``extract_clips`` (a decode that hangs in native
  code cannot be interrupted from Python);
- ``video``: what a decode reports (``VideoInfo``, ``ExtractError``) and the end-of-video rules both decoders share;
- ``frames``: the target times of a request, the frames kept for them, resizing and JPEG encoding.

This package's ``__init__`` imports nothing, so importing one module never loads a decoder it does not use.
"""
