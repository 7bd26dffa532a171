"""The demo's own code, kept out of the library: the sample corpus generator and the motion-direction probe.

Modules: ``corpus`` (``ptrain sample-data``: moving-shape videos with ASR-like captions and their ground truth),
``probe`` (the direction probe on held-out clips of such a corpus), ``eval`` (the ``ptrain eval`` verb: ptrain's
retrieval eval, then the probe when ``probe.sample_meta`` is given). ``ptrain_demo`` imports ``ptrain`` and
``sharding``; neither imports it.
"""
