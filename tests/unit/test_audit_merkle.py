"""RFC 6962 tree maths against the certificate-transparency test vectors and a reference."""

from __future__ import annotations

import binascii

import pytest

from enclave.audit import _merkle as m

# The eight leaves of certificate-transparency's merkle_tree_test and their roots.
CT_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
LEAVES = [m.leaf_hash(binascii.unhexlify(x)) for x in CT_LEAVES]


def _reference(leaves: list[bytes]) -> bytes:
    if not leaves:
        return m.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = m._split(len(leaves))
    return m.node_hash(_reference(leaves[:k]), _reference(leaves[k:]))


def test_the_empty_tree_root_is_the_hash_of_nothing() -> None:
    assert m.root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("n", range(1, 9))
def test_roots_match_the_ct_vectors(n: int) -> None:
    assert m.root(LEAVES[:n]).hex() == CT_ROOTS[n - 1]


def test_leaves_and_nodes_are_domain_separated() -> None:
    a, b = LEAVES[1], LEAVES[2]
    assert m.leaf_hash(a + b) != m.node_hash(a, b)


def test_every_proof_verifies_for_every_size_up_to_33() -> None:
    leaves = [m.leaf_hash(bytes([i])) for i in range(33)]
    for n in range(1, 34):
        tree = leaves[:n]
        r = m.root(tree)
        assert r == _reference(tree)
        for i in range(n):
            m.verify_inclusion(
                index=i, size=n, leaf=tree[i], proof=m.inclusion_proof(i, tree), expected_root=r
            )
        for k in range(1, n + 1):
            m.verify_consistency(
                old_size=k,
                new_size=n,
                old_root=m.root(tree[:k]),
                new_root=r,
                proof=m.consistency_proof(k, tree),
            )


def test_known_proof_shapes() -> None:
    # RFC 9162 §2.1.5's example tree of 7 leaves: the path of leaf 0 has 3 nodes, of leaf 6
    # (the lone right leaf) 2; the consistency proof from 3 to 7 has 4 ([c, d, g, l]).
    tree = LEAVES[:7]
    assert len(m.inclusion_proof(0, tree)) == 3
    assert len(m.inclusion_proof(6, tree)) == 2
    assert len(m.consistency_proof(3, tree)) == 4
    assert m.consistency_proof(4, tree) == [m.root(tree[4:7])]  # RFC 6962 §2.1.3: [l]


# PATH and PROOF from the certificate-transparency / trillian reference data over the same
# eight leaves: (index or old size, tree size) -> hashes.
CT_INCLUSION = {
    (0, 1): [],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


@pytest.mark.parametrize(("index", "size"), sorted(CT_INCLUSION))
def test_inclusion_proofs_match_the_ct_vectors(index: int, size: int) -> None:
    want = [bytes.fromhex(h) for h in CT_INCLUSION[index, size]]
    tree = m.Tree(LEAVES)
    assert m.inclusion_proof(index, LEAVES[:size]) == want
    assert tree.inclusion_proof(index, size) == want
    m.verify_inclusion(
        index=index,
        size=size,
        leaf=LEAVES[index],
        proof=want,
        expected_root=bytes.fromhex(CT_ROOTS[size - 1]),
    )


@pytest.mark.parametrize(("old", "size"), sorted(CT_CONSISTENCY))
def test_consistency_proofs_match_the_ct_vectors(old: int, size: int) -> None:
    want = [bytes.fromhex(h) for h in CT_CONSISTENCY[old, size]]
    tree = m.Tree(LEAVES)
    assert m.consistency_proof(old, LEAVES[:size]) == want
    assert tree.consistency_proof(old, size) == want
    m.verify_consistency(
        old_size=old,
        new_size=size,
        old_root=bytes.fromhex(CT_ROOTS[old - 1]),
        new_root=bytes.fromhex(CT_ROOTS[size - 1]),
        proof=want,
    )


def test_the_incremental_tree_agrees_with_the_reference_at_every_size() -> None:
    leaves = [m.leaf_hash(i.to_bytes(2, "big")) for i in range(70)]
    tree = m.Tree()
    for n in range(70):
        assert len(tree) == n and tree.root(n) == _reference(leaves[:n])
        tree.extend([leaves[n]])
    big = m.Tree(leaves)  # appended at once, hashed level by level
    lv = m.levels(b"".join(leaves))
    for n in range(1, 71):
        assert big.root(n) == tree.root(n) == m.prefix_root(lv, n) == _reference(leaves[:n])
        for i in range(n):
            assert big.inclusion_proof(i, n) == m.inclusion_proof(i, leaves[:n])
        for k in range(1, n + 1):
            assert big.consistency_proof(k, n) == m.consistency_proof(k, leaves[:n])


def test_the_tree_refuses_what_it_does_not_hold() -> None:
    tree = m.Tree(LEAVES)
    with pytest.raises(m.ProofError, match="size 9"):
        tree.root(9)
    with pytest.raises(m.ProofError, match="outside"):
        tree.inclusion_proof(8, 8)
    with pytest.raises(m.ProofError, match="from size 0"):
        tree.consistency_proof(0, 8)
    with pytest.raises(m.ProofError, match="32 bytes"):
        tree.extend([b"short"])
    assert len(tree) == 8
