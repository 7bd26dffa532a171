"""A submitted sharding job on a two-node loopback cluster: its tasks spread over both nodes, `ptrain jobs` shows its
progress while it runs, and a Ray worker killed in the middle of a decode task costs nothing (the task is retried):
every clip once, the same bytes as a local run without a kill.

The cluster (tests/ray_local.py) is a head with 1 CPU and a second node with 1 CPU and a resource of its own, each
node in a process session of its own. The kill lands inside a decode task by construction, not by timing: the
test-only start-up hook (tests/hooks/slow) holds the first decode on the second node until its worker is killed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from net import is_loopback, listeners, session_pids
from ray_local import SECOND_NODE, loopback_cluster

REPO = Path(__file__).resolve().parent.parent
HOOK = Path(__file__).parent / "hooks" / "slow"
PTRAIN = [sys.executable, "-m", "ptrain"]
# one video per decode task: the held task holds one video, and the other tasks go on around it
SHARD_ARGS = ["max_samples_per_shard=4", "frame_size=32", "plan.num_frames=4", "plan.sampling=uniform",
              "plan.min_seconds=1.5", "plan.max_seconds=4", "videos_per_decode_task=1", "progress=false"]


def _args(corpus: Path, out: Path) -> list[str]:
    return [f"videos={corpus / 'videos'}", f"captions={corpus / 'caption.json'}", f"out={out}", *SHARD_ARGS]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_jobs_list_shows_a_shard_jobs_progress_from_its_output(tmp_path):
    from ptrain.cluster import _progress

    out = tmp_path / "out"
    meta = {"ptrain_verb": "shard", "ptrain_output": str(out)}
    assert _progress(meta) == "-"  # nothing written yet
    out.mkdir()
    progress = {"state": "running", "shards_committed": 3, "shards_total": 10, "clips_in_done_groups": 12,
                "clips_total": 40, "failures_by_class": {"corrupt": 1, "missing": 2}, "eta_s": 95}
    (out / "progress.json").write_text(json.dumps(progress))
    assert _progress(meta) == "3/10 shards, 12/40 clips, 3 failures, ETA 1m35s (running)"
    (out / "progress.json").write_text(json.dumps(progress | {"state": "done", "shards_committed": 10}))
    assert _progress(meta) == "10/10 shards, 12/40 clips, 3 failures (done)"
    assert _progress({"ptrain_verb": "pretrain", "ptrain_output": str(out)}) == "-"


class _FakeRay:
    """``ray.nodes()`` as the placement reads it: node id -> CPUs, and which nodes are alive."""

    def __init__(self, cpus: dict[str, float]):
        self.cpus, self.dead = dict(cpus), set()

    def nodes(self):
        return [{"NodeID": n, "Alive": n not in self.dead, "Resources": {"CPU": c}} for n, c in self.cpus.items()]


def test_placement_spreads_by_load_per_cpu_and_sends_a_writer_to_its_decodes_node():
    from sharding.job import _Placement

    a, b, c = ("%056x" % i for i in (1, 2, 3))  # Ray node ids are 28 bytes of hex
    ray = _FakeRay({a: 2.0, b: 1.0, c: 0.5})  # c cannot hold a 1-CPU task: never used
    place = _Placement(ray, cpus_per_task=1.0)

    picks = [place.pick("decode", 0) for _ in range(3)] + [place.pick("decode", 1)]
    # tasks in flight per CPU: a 0 -> 0.5 -> ... ; the fewest wins, ties to the first node
    assert [node for node, _ in picks] == [a, b, a, a]
    node, where = picks[1]
    assert (where.node_id, where.soft) == (b, True)
    assert place.load == {a: 3, b: 1}

    # group 0's writer goes where two of its three decodes were, though a is the busier node (3 / 2 > 1 / 1)
    assert place.pick("write", 0)[0] == a and place.load[a] == 4
    for node in (a, a, a, a):
        place.release(node)
    place.release(b)
    assert place.load == {a: 0, b: 0}

    # a group whose decodes ran on two nodes equally: its first decode's node
    ray2 = _FakeRay({a: 1.0, b: 1.0})
    place = _Placement(ray2, cpus_per_task=1.0)
    assert [place.pick("decode", 7)[0] for _ in range(2)] == [a, b]
    assert place.pick("write", 7)[0] == a

    # a writer whose decodes' node died: the least loaded live node; the record of the group is dropped
    # in flight a 2, b 1 -> b; a 2, b 2 -> a (the first); a 3, b 2 -> b: two of group 8's three decodes on b
    assert [place.pick("decode", 8)[0] for _ in range(3)] == [b, a, b]
    ray2.dead.add(b)
    place.refresh()
    assert place.pick("write", 8)[0] == a and 8 not in place.decoded_on

    # no node with the CPUs (a cluster still growing): Ray's SPREAD, nothing counted
    place = _Placement(_FakeRay({c: 0.5}), cpus_per_task=1.0)
    assert place.pick("decode", 0) == (None, "SPREAD") and place.pick("write", 0) == (None, "SPREAD")
    assert not place.load


@pytest.mark.slow
def test_a_worker_killed_mid_decode_on_the_second_node_costs_nothing(sample_corpus, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from ptrain.config import load_config
    from sharding.config import ShardConfig
    from sharding.plan import plan_video
    from sharding.sources.howto100m import load_captions

    out = tmp_path / "shards"
    decode_log, held = tmp_path / "decodes.log", tmp_path / "held"
    hook = {"PYTHONPATH": os.pathsep.join([str(HOOK), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PTRAIN_TEST_DECODE_LOG": str(decode_log)}
    with loopback_cluster(num_cpus=1, second_node_cpus=1, extra_env=hook,
                          second_node_env={"PTRAIN_TEST_DECODE_HOLD": str(held)}) as cluster:
        env = cluster.client_env()
        proc = subprocess.run([*PTRAIN, "submit", "--address", cluster.dashboard, "shard", *_args(sample_corpus, out)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        job_id = re.search(r"^submitted (\S+) to ", proc.stdout, re.M).group(1)
        client = JobSubmissionClient(cluster.dashboard,
                                     headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})

        def status() -> str:
            return str(client.get_job_status(job_id).value)

        deadline = time.monotonic() + 300
        while not held.exists():  # the second node's first decode task: held until its worker is killed
            assert time.monotonic() < deadline and status() in ("PENDING", "RUNNING"), \
                f"no decode task was held on the second node ({status()}):\n{client.get_job_logs(job_id)[-5000:]}"
            time.sleep(0.1)
        victim, video = held.read_text().split(" ", 1)
        victim, video = int(victim), video.strip()
        assert victim in session_pids(cluster.second_session), "the held decode is not on the second node"
        assert _cmdline(victim).startswith("ray::decode_videos"), _cmdline(victim)

        # the job cannot end while a task is held: it is running, and `ptrain jobs` shows its progress
        listed = subprocess.run([*PTRAIN, "jobs", "--address", cluster.dashboard], env=env, capture_output=True,
                                text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"^{job_id}\s+RUNNING\s+shard\s.*\s\d+/\d+ shards, \d+/\d+ clips, \d+ failures, "
                         rf"ETA \S+ \(running\)\s+{re.escape(str(out))}$", listed.stdout, re.M), listed.stdout
        running = json.loads((out / "progress.json").read_text())
        assert running["state"] == "running" and running["shards_committed"] < running["shards_total"]

        # both nodes listen on loopback only (no Ray Train here, so no torch store either)
        sockets = [(session, *socket) for session in cluster.sessions for socket in listeners(session)]
        assert {session for session, *_ in sockets} == set(cluster.sessions), sockets
        assert all(is_loopback(ip) for *_, ip, _port in sockets), [s for s in sockets if not is_loopback(s[2])]

        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 300
        while (final := status()) in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-5000:]
            time.sleep(0.2)
        logs = client.get_job_logs(job_id)
        listed = subprocess.run([*PTRAIN, "jobs", "--address", cluster.dashboard], env=env, capture_output=True,
                                text=True, timeout=120)
    assert final == "SUCCEEDED", logs[-8000:]
    assert "2 Ray node(s), 2 CPUs" in logs, logs[-3000:]
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s+shard\s.*\s(\d+)/\1 shards, .* \(done\)\s", listed.stdout, re.M), \
        listed.stdout
    # the killed task ran again, in another worker process (it never finished in the killed one)
    decodes = [line.split(" ", 1) for line in decode_log.read_text().splitlines()]
    assert any(path == video and int(pid) != victim for pid, path in decodes), decodes

    # tasks ran on both nodes: the second node is the one with our resource
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "done" and progress["groups_crashed"] == 0
    nodes = progress["nodes"]
    assert len(nodes) == 2 and all(n["decode_tasks"] > 0 for n in nodes.values()), nodes
    assert sorted(SECOND_NODE in n["resources"] for n in nodes.values()) == [False, True], nodes

    # every planned clip exactly once in the shards, or in errors.jsonl
    cfg = load_config(ShardConfig, None, _args(sample_corpus, out))
    captions = load_captions(sample_corpus / "caption.json")
    planned = {clip.key: clip for vid in sorted(captions) for clip in plan_video(vid, captions[vid], cfg.plan)}
    in_shards = []
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            in_shards += sorted({n.split(".")[0] for n in tar.getnames()})
    assert len(in_shards) == len(set(in_shards)), "a clip was written twice"
    failed = set()
    for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines()):
        failed |= {e["key"]} if e["key"] else {k for k, c in planned.items() if c.video_id == e["video_id"]}
    assert not failed & set(in_shards) and set(in_shards) | failed == set(planned)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] == len(in_shards) > 0

    # byte for byte what a local run of the same command without a kill writes (a shard's bytes depend on the plan
    # and the decoded frames only, never on where or in which order its tasks ran)
    ref = tmp_path / "ref"
    proc = subprocess.run([*PTRAIN, "shard", *_args(sample_corpus, ref), "ray.num_cpus=2"], capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tars(out).keys() == _tars(ref).keys() and _tars(out) == _tars(ref)
    assert (out / "errors.jsonl").read_text() == (ref / "errors.jsonl").read_text()
