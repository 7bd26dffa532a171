"""Test-only start-up hook (never imported by production code): simulates slow storage and a slow machine.

Tests put this directory on the PYTHONPATH of the processes they start. Every Python process started with it
(a ``ptrain shard`` driver, its Ray workers, which inherit the driver's environment, and their spawned
children) imports this module at start-up.

- ``PTRAIN_TEST_START_DELAY_S``: sleep that long at start-up (a loaded machine's slow process start).
- ``PTRAIN_TEST_COMMIT_DELAY_S``: ``sharding.write.write_shard`` is wrapped so that it appends
  ``<pid> <shard>`` to ``PTRAIN_TEST_COMMIT_LOG`` after each committed shard (tar + sidecar), then sleeps that
  long, so a test can kill the run between two commits and check that the hook really ran inside the Ray
  workers.
- ``PTRAIN_TEST_DECODE_LOG``: ``sharding.decode.worker.decode_planned`` (one video's decode, called by a decode
  task at call time) appends ``<pid> <video path>`` to that file before it decodes.
- ``PTRAIN_TEST_DECODE_HOLD``: the first decode, among every process with this variable, that creates the file it
  names (``<pid> <video path>``) never returns: its task is held until the test kills the worker. Every later decode
  (the retry of the held task included) finds the file there and runs as usual.
"""

import importlib.machinery
import importlib.util
import os
import sys
import time

if os.environ.get("PTRAIN_TEST_START_DELAY_S"):
    time.sleep(float(os.environ["PTRAIN_TEST_START_DELAY_S"]))

_delay = os.environ.get("PTRAIN_TEST_COMMIT_DELAY_S")
if _delay:
    import functools

    import sharding.write as _write

    _orig = _write.write_shard

    @functools.wraps(_orig)
    def _slow_write_shard(*args, **kwargs):
        sidecar = _orig(*args, **kwargs)
        log = os.environ.get("PTRAIN_TEST_COMMIT_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {sidecar['shard']}\n")
        time.sleep(float(_delay))
        return sidecar

    # before sharding.job does `from sharding.write import write_shard`, so the job binds the slow one
    _write.write_shard = _slow_write_shard

_decode_log = os.environ.get("PTRAIN_TEST_DECODE_LOG")
_decode_hold = os.environ.get("PTRAIN_TEST_DECODE_HOLD")
if _decode_log or _decode_hold:
    import functools

    import sharding.decode.worker as _decode

    _orig_decode = _decode.decode_planned

    @functools.wraps(_orig_decode)
    def _watched_decode(worker, path, *args, **kwargs):
        line = f"{os.getpid()} {path}\n"
        if _decode_log:
            with open(_decode_log, "a") as f:
                f.write(line)
        if _decode_hold:
            tmp = f"{_decode_hold}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(line)
            try:
                os.link(tmp, _decode_hold)  # atomic and exclusive: one holder, and its file is whole when seen
                held = True
            except FileExistsError:
                held = False
            os.unlink(tmp)
            while held:
                time.sleep(60)  # until the test kills this process
        return _orig_decode(worker, path, *args, **kwargs)

    _decode.decode_planned = _watched_decode

# keep any sitecustomize this one shadows (a distribution's, a coverage hook)
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
