"""Pure parts of the scan: shard store, search index, summary statistics, Carlini's tiled L2 and cliques."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from diffmem.scan.carlini import carlini_clique, max_clique_size, tiled_l2
from diffmem.scan.index import FaissIndex, TorchIndex, build_index, nearest_other
from diffmem.scan.store import ShardStore
from diffmem.scan.summary import flag_metrics, similarity_stats, top_fraction


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_shard_store_commits_whole_files_only(tmp_path):
    store = ShardStore(tmp_path, "gens")
    assert store.done_shards() == []
    store.write_table(3, pa.table({"a": [1, 2]}))
    store.write_table(0, pa.table({"a": [0]}))
    (store.folder / ".gens-000001.parquet.abc.tmp").write_bytes(b"half written")  # a killed writer's leftover
    assert store.done_shards() == [0, 3] and store.done(3) and not store.done(1)
    assert store.concat().column("a").to_pylist() == [0, 1, 2]
    store.write_table(4, pa.table({"a": [3], "b": ["added later"]}))  # a column added in a later version
    assert store.concat().column("b").to_pylist() == [None, None, None, "added later"]


def test_indexes_agree_with_brute_force():
    base, queries = _unit(2000, 32, 0), _unit(50, 32, 1)
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :3]
    for index in (FaissIndex(base), TorchIndex(base, chunk=300), build_index(base, kind="torch")):
        sims, pos = index.search(queries, k=3)
        assert np.array_equal(pos, truth), type(index).__name__
        np.testing.assert_allclose(sims, np.take_along_axis(queries @ base.T, truth, 1), atol=1e-5)
    ivf = FaissIndex(base, kind="ivf", nlist=8, nprobe=8)  # all lists probed: exact
    assert ivf.kind == "ivf" and np.array_equal(ivf.search(queries, k=3)[1], truth)
    assert FaissIndex(base, kind="auto").kind == "flat"
    with pytest.raises(ValueError, match="--index"):
        FaissIndex(base, kind="hnsw")


def test_background_excludes_self_and_sees_duplicates():
    base = _unit(100, 16, 2)
    base[10] = base[20]  # a duplicated training image
    index = FaissIndex(base)
    sims, pos = nearest_other(index, base, np.arange(100))
    assert pos[10] == 20 and pos[20] == 10 and sims[10] == pytest.approx(1.0, abs=1e-5)
    assert (pos != np.arange(100)).all()
    brute = base @ base.T
    np.fill_diagonal(brute, -np.inf)
    np.testing.assert_allclose(sims, brute.max(axis=1), atol=1e-5)


def test_similarity_stats_and_flags():
    x = np.array([0.1, 0.2, 0.5, 0.6, 0.9, np.nan])
    s = similarity_stats(x, "sim", {"05pc": 0.5})
    assert s["sim_n"] == 5
    assert s["sim_mean"] == pytest.approx(0.46)
    assert s["sim_95pc"] == pytest.approx(np.percentile(x[:5], 95))
    assert s["sim_gt_05pc"] == pytest.approx(0.4)  # strictly greater, as in Somepalli et al.'s code
    assert similarity_stats([], "bg")["bg_mean"] is None
    m = flag_metrics([True, True, False, False], [1, 0, 1, 0])
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["precision"], m["recall"]) == (1, 1, 1, 1, 0.5, 0.5)
    assert top_fraction([0.3, 0.9, 0.9, 0.1], ["d", "c", "b", "a"], 0.5) == {"b", "c"}
    assert top_fraction([0.3, 0.9, 0.1], ["a", "b", "c"], 0.34) == {"b", "a"}  # ceil(0.34 * 3) = 2
    with pytest.raises(ValueError, match="--top-fraction"):
        top_fraction([1.0], ["a"], 0)


def test_tiled_l2_catches_a_local_difference():
    rng = np.random.default_rng(0)
    a = rng.random((64, 64, 3))
    b = a.copy()
    assert tiled_l2(a, b) == 0
    b[:16, :16] = 1 - b[:16, :16]  # one of 16 tiles changed
    whole = np.sqrt(np.mean((a - b) ** 2))
    assert tiled_l2(a, b) == pytest.approx(np.sqrt(np.mean((a[:16, :16] - b[:16, :16]) ** 2)))
    assert tiled_l2(a, b) > 3 * whole
    with pytest.raises(ValueError, match="different shapes"):
        tiled_l2(a, b[:32])


def test_max_clique_and_carlini_flag():
    adj = np.zeros((6, 6), bool)
    for i, j in [(0, 1), (0, 2), (1, 2), (2, 3), (3, 4), (4, 5), (3, 5)]:
        adj[i, j] = adj[j, i] = True
    assert max_clique_size(adj) == 3
    adj[1, 3] = adj[3, 1] = adj[0, 3] = adj[3, 0] = True
    assert max_clique_size(adj) == 4
    rng = np.random.default_rng(1)
    copy = rng.random((32, 32, 3))
    gens = [copy + 0.01 * rng.standard_normal(copy.shape) for _ in range(3)] + [
        rng.random((32, 32, 3)) for _ in range(2)
    ]
    size, min_dist = carlini_clique(gens, delta=0.15)
    assert size == 3 and min_dist < 0.05
