"""The trace replay: the loader maps tasks as documented, replays never double-allocate."""

from __future__ import annotations

from pathlib import Path

from bench import trace_replay as tr
from bench.fleet import snapshot
from bench.policies import POLICIES
from tessera.scheduler.core.request import DeviceForm, DeviceKind, NumaPolicy


def test_loader_reads_the_copied_trace() -> None:
    nodes, tasks = tr.load_nodes(), tr.load_tasks()
    assert len(nodes) == 1213
    assert len(tasks) == 8152
    assert sum(1 for t in tasks if tr.task_class(t) is None) == 1088  # CPU only


def test_tasks_map_as_documented() -> None:
    whole = tr.request_of(tr.TraceTask("w", 2, 1000, 0, 1))
    assert whole is not None
    (claim,) = whole.claims
    assert claim.count == 2 and claim.accepted_forms() == {DeviceForm.WHOLE_DEVICE}
    assert whole.numa_policy is NumaPolicy.PREFERRED
    shared = tr.request_of(tr.TraceTask("s", 1, 460, 0, 1))
    assert shared is not None
    (claim,) = shared.claims
    assert claim.accepted_forms() == {DeviceForm.MIG, DeviceForm.MDEV}
    assert claim.mig_profiles == {"4g.40gb", "4g.20gb"}  # 3/7 < 0.46 <= 4/7
    assert claim.mdev_types == {"nvidia-288"}  # 1/2 of a GPU
    assert tr.mdev_type_for(100) == "nvidia-63" and tr.mig_slices_for(100) == 1
    assert tr.request_of(tr.TraceTask("c", 0, 0, 0, 1)) is None


def test_fleet_mirrors_node_gpu_counts() -> None:
    nodes = [
        tr.TraceNode("a", 8, "G2"),
        tr.TraceNode("b", 8, "G3"),
        tr.TraceNode("c", 4, "T4"),
        tr.TraceNode("d", 2, "P100"),
        tr.TraceNode("e", 1, "A10"),
        tr.TraceNode("f", 8, "V100M32"),
    ]
    snap = snapshot(tr.build_trace_fleet(nodes))
    for node in nodes:
        view = snap.hosts[node.sn].view  # type: ignore[index]
        gpus = [f.address for f in view.whole_devices(DeviceKind.GPU)]
        assert len(gpus) == node.gpus
        if tr.MODEL_CLASS[node.model] == "mig":
            assert all(view.gpus[a].mig_enabled for a in gpus)
        else:
            assert set(view.mdev_parents) == set(gpus)


def test_small_replay_is_safe_and_in_range(tmp_path: Path) -> None:
    nodes = tr.load_nodes()[::60]
    tasks = [t for t in tr.load_tasks() if tr.task_class(t) is not None][::40]
    snap = snapshot(tr.build_trace_fleet(nodes))
    classes = tr.frag_classes(tasks)
    results = {}
    for name in POLICIES:
        r = tr.replay(name, snap, tasks, classes, check=True, departures=False, samples=10)
        assert r["slot_collisions"] == 0
        assert r["checker_violations"] == 0
        assert r["accepted"] + r["rejected"] == len(tasks)
        for key in ("acceptance", "demand_acceptance", "numa_aligned", "switch_aligned"):
            assert 0.0 <= r[key] <= 1.0
        for s in r["series"]:
            for key in (
                "allocated",
                "fragmented_of_free",
                "fragmented_of_all",
                "mig_fragmentation",
            ):
                assert -1e-9 <= s[key] <= 1 + 1e-9
        results[name] = r
    timed = tr.replay("first-fit", snap, tasks, classes, samples=5)
    assert timed["slot_collisions"] == 0
    result = {
        "mode": "quick",
        "selection": {
            "nodes": len(nodes),
            "trace_nodes": 1213,
            "tasks": len(tasks),
            "cpu_only_skipped": 0,
            "trace_tasks": len(tasks),
            "sampling": "test",
        },
        "fleet": {"hosts": len(nodes), "gpus": sum(n.gpus for n in nodes), "mapping": {}},
        "task_mix": {},
        "policies": results,
        "timed": {"first-fit": timed},
    }
    text = tr.section(result, tmp_path)
    assert "(d) Alibaba GPU trace replay" in text
    assert all(name in text for name in POLICIES)
    assert list(tmp_path.glob("*.png"))
