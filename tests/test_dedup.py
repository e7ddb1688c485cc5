"""MinHash, LSH and connected components on real text, against exact Jaccard and a plain union-find."""
from __future__ import annotations

import numpy as np

from data_pipeline import minhash
from data_pipeline.dedup import DedupConfig, components, resolve
from tests.test_curate import edit_to_jaccard, stdlib_docstring_docs


def test_signature_estimates_jaccard_on_real_text():
    docs = stdlib_docstring_docs(12)
    pairs = []
    for i, t in enumerate(docs[:6]):
        for target in (0.9, 0.7, 0.5, 0.3):
            pairs.append((t, edit_to_jaccard(t, target, tol=0.05)))
    pairs.append((docs[6], docs[7]))  # unrelated
    sig = minhash.signatures([x for p in pairs for x in p])
    for k, (a, b) in enumerate(pairs):
        est = minhash.estimated_jaccard(sig[2 * k], sig[2 * k + 1])
        assert abs(est - minhash.jaccard(a, b)) < 0.1, (k, est, minhash.jaccard(a, b))


def test_signatures_do_not_depend_on_batching():
    docs = stdlib_docstring_docs(6) + ["short", "", "tiny but longer than 24 characters"]
    together = minhash.signatures(docs)
    alone = np.stack([minhash.signatures([d])[0] for d in docs])
    assert np.array_equal(together, alone)
    assert not np.array_equal(together[0], together[1])
    assert np.array_equal(minhash.signatures(["x" * 30]), minhash.signatures(["x" * 31]))  # same shingle set


def test_exact_hash_normalizes_case_and_whitespace():
    assert minhash.exact_hash("Hello  World\n") == minhash.exact_hash("hello world")
    assert minhash.exact_hash("hello world") != minhash.exact_hash("hello worlds")


def test_components_match_plain_union_find():
    rng = np.random.default_rng(0)
    n = 500
    e = rng.integers(0, n, size=(300, 2))
    root = components(e[:, 0], e[:, 1], n)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in e:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), []).append(x)
    for members in groups.values():
        assert all(root[m] == min(members) for m in members)


def test_resolve_keeps_earliest_and_splits_exact_from_fuzzy():
    # refs: 1,2,3 identical texts; 4 ~ 1 (fuzzy); 10 ~ 11 (fuzzy), 20 alone
    exact = np.array([[1, 2], [1, 3]])
    fuzzy = np.array([[2, 4], [10, 11], [3, 4]])
    res = resolve(exact, fuzzy, DedupConfig(verify=False), None)
    assert res["exact"].tolist() == [2, 3]
    assert res["fuzzy"].tolist() == [4, 11]
    assert res["stats"]["fuzzy_clusters"] == 2
