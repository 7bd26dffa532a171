"""The ``ptrain eval`` verb: ptrain's held-out retrieval eval, then the demo's direction probe when one is asked for.

    ptrain eval export=RUN shards=[DIR]                                           # retrieval only
    ptrain eval export=RUN shards=[DIR] probe.sample_meta=demo/raw/sample_meta.json probe.min_overlap=0.7 out=E.json

``EvalWithProbeConfig`` is ``ptrain.configs.EvalConfig`` with a ``probe`` section; without ``probe.sample_meta`` this
is ``ptrain.evaluate.run``. With it, the clips are also embedded played backwards and the probe's numbers are
printed after the retrieval tables and stored under ``"probe"`` in the results JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptrain.config import section
from ptrain.configs import EvalConfig
from ptrain_demo.probe import ProbeConfig


@dataclass
class EvalWithProbeConfig(EvalConfig):
    """``ptrain eval``: embed held-out shards with an export and report retrieval metrics (+ the direction probe)."""

    probe: ProbeConfig = section(ProbeConfig, "motion-direction probe (sample data)")


def run(cfg: EvalWithProbeConfig) -> int:
    from ptrain.evaluate import run as run_eval
    from ptrain_demo.probe import direction_probe

    def probe(results, model, emb) -> None:
        results["probe"] = p = direction_probe(model, emb, cfg.probe.sample_meta, cfg.probe.min_overlap)
        if p["probe_clips"]:
            print(f"direction probe ({p['probe_clips']} clips inside one event): 4-way accuracy {p['direction_acc']:.1f}% "
                  f"(chance 25%), true vs opposite caption {p['order_acc']:.1f}% (chance 50%), true caption: "
                  f"clip vs clip played backwards {p['reversal_acc']:.1f}% (order-blind heads: exactly 50%)")
        else:
            print("direction probe: no held-out clip lies inside a single event")

    with_probe = bool(cfg.probe.sample_meta)
    return run_eval(cfg, reversed_too=with_probe, extra=probe if with_probe else None)
