from __future__ import annotations

import json

import numpy as np
import pytest

from pfpl.data.partitions import SCHEMES, Partition, PartitionError, client_test_sets, make_partition

C, K, PER = 40, 5, 4


def synthetic(per: int = PER, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """C classes x K domains x ``per`` samples, in shuffled order (real splits are not sorted)."""
    labels = np.repeat(np.arange(C), K * per)
    domains = np.tile(np.repeat(np.arange(K), per), C)
    order = np.random.default_rng(seed).permutation(len(labels))
    return labels[order].astype(np.int64), domains[order].astype(np.int64)


LABELS, DOMAINS = synthetic()
N = len(LABELS)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def assert_well_formed(part: Partition) -> None:
    for ix in part.clients:
        assert ix.dtype == np.int64 and len(ix) > 0
        assert np.all(np.diff(ix) > 0), "sorted, no duplicates"
    allix = np.concatenate(part.clients)
    assert len(np.unique(allix)) == len(allix), "clients are disjoint"


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet"])
def test_cover_every_sample_exactly_once(scheme):
    part = make_partition(LABELS, DOMAINS, 7, scheme, seed=3)
    assert part.scheme == scheme and part.n_clients == 7
    assert_well_formed(part)
    assert np.array_equal(np.sort(np.concatenate(part.clients)), np.arange(N))


def test_iid_sizes_even():
    sizes = make_partition(LABELS, DOMAINS, 7, "iid", seed=0).sizes()
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n_clients", [1, 7, 10, 40])
def test_pathological_whole_classes_split_evenly(n_clients):
    part = make_partition(LABELS, DOMAINS, n_clients, "pathological", seed=1)
    classes = part.client_classes(LABELS)
    union = np.concatenate(classes)
    assert len(np.unique(union)) == len(union), "class sets are disjoint"
    assert np.array_equal(np.sort(union), np.arange(C))
    n_cls = [len(c) for c in classes]
    assert max(n_cls) - min(n_cls) <= 1
    for ix, cls in zip(part.clients, classes):
        assert np.array_equal(ix, np.flatnonzero(np.isin(LABELS, cls))), "all samples of its classes"


def test_pathological_too_many_clients():
    with pytest.raises(PartitionError) as e:
        make_partition(LABELS, DOMAINS, 41, "pathological", seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "41" in msg and "40" in msg


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_and_seed_sensitive(scheme):
    a = make_partition(LABELS, DOMAINS, 8, scheme, seed=11)
    b = make_partition(LABELS, DOMAINS, 8, scheme, seed=11)
    c = make_partition(LABELS, DOMAINS, 8, scheme, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))
    assert not all(np.array_equal(x, y) for x, y in zip(a.clients, c.clients))
    assert a.params["seed"] == 11


def test_dirichlet_min_size_honoured():
    part = make_partition(LABELS, DOMAINS, 20, "dirichlet", seed=0, alpha=0.1, min_size=12)
    assert min(part.sizes()) >= 12
    assert part.params["alpha"] == 0.1


def test_dirichlet_impossible_min_size():
    with pytest.raises(PartitionError, match="min_size=100"):
        make_partition(LABELS, DOMAINS, 10, "dirichlet", seed=0, min_size=100)
    # Feasible on paper (800 = 40 x 20) but no Dirichlet draw with tiny alpha is that balanced.
    with pytest.raises(PartitionError) as e:
        make_partition(LABELS, DOMAINS, 40, "dirichlet", seed=0, alpha=0.01, min_size=20)
    assert "\n" not in str(e.value) and "alpha=0.01" in str(e.value)


def test_dirichlet_smaller_alpha_more_skew():
    def mean_entropy(alpha):
        part = make_partition(LABELS, DOMAINS, 10, "dirichlet", seed=0, alpha=alpha, min_size=1)
        return np.mean([entropy(np.bincount(LABELS[ix], minlength=C)) for ix in part.clients])

    skewed, flat = mean_entropy(0.05), mean_entropy(100.0)
    assert flat > np.log(C) - 0.15, "alpha=100 is close to iid"
    assert skewed < flat - 1.0


@pytest.mark.parametrize("n_clients", [3, 5, 12])
def test_domain_one_domain_per_client(n_clients):
    part = make_partition(LABELS, DOMAINS, n_clients, "domain", seed=2)
    assert_well_formed(part)
    doms = part.client_domains(DOMAINS)
    assert all(len(d) == 1 for d in doms)
    doms = np.array([int(d[0]) for d in doms])
    assert len(np.unique(doms)) == min(n_clients, K), "round-robin uses as many domains as it can"
    for d in np.unique(doms):
        members = np.flatnonzero(doms == d)
        got = np.sort(np.concatenate([part.clients[k] for k in members]))
        assert np.array_equal(got, np.flatnonzero(d == DOMAINS)), "sharers split the whole domain"
        sizes = [len(part.clients[k]) for k in members]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n_clients,cpc", [(8, None), (8, 3), (10, None), (3, None)])
def test_domain_class_one_domain_and_class_subset(n_clients, cpc):
    part = make_partition(LABELS, DOMAINS, n_clients, "domain_class", seed=4, classes_per_client=cpc)
    assert_well_formed(part)
    doms = np.array([int(d[0]) for d in part.client_domains(DOMAINS)])
    assert all(len(d) == 1 for d in part.client_domains(DOMAINS))
    classes = part.client_classes(LABELS)
    for ix, d, cls in zip(part.clients, doms, classes):
        assert np.array_equal(ix, np.flatnonzero((d == DOMAINS) & np.isin(LABELS, cls))), "intersection"
    for d in np.unique(doms):
        members = np.flatnonzero(doms == d)
        if len(members) == 1:
            want = cpc if cpc is not None else max(1, C // n_clients)
            assert len(classes[members[0]]) == want
        else:
            union = np.concatenate([classes[k] for k in members])
            assert len(np.unique(union)) == len(union) and np.array_equal(np.sort(union), np.arange(C))
            n_cls = [len(classes[k]) for k in members]
            assert max(n_cls) - min(n_cls) <= 1


def test_domain_class_too_many_classes():
    with pytest.raises(PartitionError) as e:
        make_partition(LABELS, DOMAINS, 5, "domain_class", seed=0, classes_per_client=41)
    assert "\n" not in str(e.value) and "41" in str(e.value)


def test_counts_table_matches_and_is_json():
    part = make_partition(LABELS, DOMAINS, 6, "dirichlet", seed=5)
    classnames = [f"class{c}" for c in range(C)]
    domainnames = [f"style{d}" for d in range(K)]
    rows = json.loads(json.dumps(part.counts_table(LABELS, DOMAINS, classnames, domainnames)))
    assert [r["client"] for r in rows] == list(range(6))
    for r, ix in zip(rows, part.clients):
        assert r["n"] == len(ix) == sum(r["classes"].values()) == sum(r["domains"].values())
        cc = np.bincount(LABELS[ix], minlength=C)
        assert r["classes"] == {classnames[c]: int(cc[c]) for c in range(C) if cc[c] > 0}
        dc = np.bincount(DOMAINS[ix], minlength=K)
        assert r["domains"] == {domainnames[d]: int(dc[d]) for d in range(K) if dc[d] > 0}


def test_test_sets_pathological_is_all_test_images_of_its_classes():
    test_labels, test_domains = synthetic(per=2, seed=9)
    part = make_partition(LABELS, DOMAINS, 4, "pathological", seed=0)
    sets = client_test_sets(part, LABELS, DOMAINS, test_labels, test_domains)
    for (ix, w), cls in zip(sets, part.client_classes(LABELS)):
        assert np.array_equal(ix, np.flatnonzero(np.isin(test_labels, cls)))
        assert np.allclose(w, 1 / len(ix))


@pytest.mark.parametrize("scheme", ["dirichlet", "domain", "domain_class"])
def test_test_sets_weighted_like_training(scheme):
    # Unbalanced test split: pair (c, d) has 1 + (c + d) % 3 samples; some pairs are absent.
    pairs = [(c, d) for c in range(C) for d in range(K) for _ in range(1 + (c + d) % 3)]
    test_labels = np.array([p[0] for p in pairs], dtype=np.int64)
    test_domains = np.array([p[1] for p in pairs], dtype=np.int64)
    part = make_partition(LABELS, DOMAINS, 6, scheme, seed=7, alpha=0.3)
    sets = client_test_sets(part, LABELS, DOMAINS, test_labels, test_domains)
    assert len(sets) == part.n_clients
    for (ix, w), tr in zip(sets, part.clients):
        assert ix.dtype == np.int64 and len(ix) == len(w) and np.all(w > 0)
        assert np.isclose(w.sum(), 1.0)
        train_key = LABELS[tr] * K + DOMAINS[tr]
        test_key = test_labels[ix] * K + test_domains[ix]
        assert np.all(np.isin(test_key, train_key)), "only the client's (class, domain) pairs"
        # Weighted test distribution over pairs equals the client's training distribution.
        got = np.bincount(test_key, weights=w, minlength=C * K)
        want = np.bincount(train_key, minlength=C * K) / len(tr)
        assert np.allclose(got, want)


def test_test_sets_missing_pairs_error():
    part = make_partition(LABELS, DOMAINS, 2, "pathological", seed=0)
    only = part.client_classes(LABELS)[0]
    keep = np.isin(LABELS, only)
    with pytest.raises(PartitionError, match="client 1"):
        client_test_sets(part, LABELS, DOMAINS, LABELS[keep], DOMAINS[keep])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"scheme": "powerlaw"}, "'powerlaw'"),
        ({"alpha": 0.0, "scheme": "dirichlet"}, "alpha=0.0"),
        ({"alpha": -1, "scheme": "dirichlet"}, "alpha=-1"),
        ({"n_clients": 0}, "n_clients=0"),
        ({"n_clients": 801}, "801"),
        ({"classes_per_client": 0, "scheme": "domain_class"}, "classes_per_client=0"),
        ({"min_size": -1, "scheme": "dirichlet"}, "min_size=-1"),
        ({"labels": LABELS[:10]}, "same length"),
        ({"labels": LABELS.astype(float)}, "float64"),
    ],
)
def test_errors_are_one_line_and_name_the_value(kwargs, needle):
    args = {"labels": LABELS, "domains": DOMAINS, "n_clients": 4, "scheme": "iid", "seed": 0, **kwargs}
    with pytest.raises(PartitionError) as e:
        make_partition(**args)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg
    if kwargs.get("scheme") == "powerlaw":
        assert all(s in msg for s in SCHEMES)


def test_novel_classes_are_a_seeded_share_of_the_classes():
    from pfpl.data.partitions import novel_classes

    novel = novel_classes(LABELS, 0.25, seed=3)
    assert len(novel) == 10 and np.all(np.diff(novel) > 0) and np.isin(novel, np.arange(C)).all()
    assert np.array_equal(novel, novel_classes(LABELS, 0.25, seed=3))
    assert not np.array_equal(novel, novel_classes(LABELS, 0.25, seed=4))
    assert len(novel_classes(LABELS, 0.0, seed=3)) == 0
    with pytest.raises(PartitionError, match="at least one class must be novel and one base"):
        novel_classes(np.array([0, 1, 1]), 0.1, seed=0)


def test_training_pool_holds_out_novel_classes_and_domains_then_partitions_only_base():
    from pfpl.data.partitions import novel_classes, training_pool

    novel = novel_classes(LABELS, 0.5, seed=0)
    pool = training_pool(LABELS, DOMAINS, novel, np.array([2]))
    assert not np.isin(LABELS[pool], novel).any() and not (DOMAINS[pool] == 2).any()
    assert len(pool) == N // 2 * (K - 1) // K  # every other record of a base class stays
    part = make_partition(LABELS[pool], DOMAINS[pool], 10, "pathological", seed=0)
    for ix in part.clients:
        assert not np.isin(LABELS[pool[ix]], novel).any()
    with pytest.raises(PartitionError, match="leaves no training records"):
        training_pool(LABELS, DOMAINS, np.arange(C), np.empty(0, np.int64))
