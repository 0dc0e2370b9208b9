"""Secure sums (SecAgg+, Bell et al. 2020) over Flower's primitives, several sums per key setup.

The server learns ``sum_k x_k`` over the clients that finished, and nothing else about any
``x_k``: each client adds a private mask (from its own seed) and, for every neighbour,
a pairwise mask (from an ECDH key agreement) that the neighbour subtracts. Seeds and
pairwise keys are Shamir-shared among neighbours beforehand, so that when a client drops
out the server can, with ``threshold`` shares, remove the masks it left in the others'
vectors. A survivor's private seed or a dropped client's pairwise key is revealed for a
sum, never both.

From Flower (``flwr.common.secure_aggregation``, ``flwr.supercore.primitives``): key pairs,
ECDH + HKDF shared keys, Fernet encryption of the shares, Shamir sharing. Our own, and
why:

- **Several sums per setup.** Exact low-rank aggregation needs two sums a round
  (:mod:`fedlowrank.aggregation.sketch`). Each sum has its own pairwise key pair and private
  seed per client, all shared at setup, so a client that finishes the first sum and drops
  before the second reveals the second sum's pairwise key only: its first vector stays
  masked. (Deriving both sums' masks from one key would unmask it.)
- **Masks from the whole 256-bit key.** Flower's ``pseudo_rand_gen`` folds the seed to 32
  bits (a seed space a server can search); masks here are PCG64 streams seeded with
  SHA-256 of the key and the sum's label.
- **Quantisation that never wraps.** Values are clipped to a bound each array declares
  (counted, not silent), scaled to signed ``bits``-bit integers and summed modulo 2^64 (two's
  complement), ``bits`` chosen so that the sum of all clients' integers stays within int64:
  no sum wraps, whatever the values. (Flower's ``quantize`` offsets values by the clipping
  range first, which keeps only the range's precision; signed integers keep each value's.)

The neighbour graph is SecAgg+'s: the nodes in a ring, each with the ``share_num``
(odd) nodes centred on it (all nodes when ``share_num`` covers them: SecAgg).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)


MAX_SHARE_SUBSETS = 16
"""Subsets of shares tried per node before its secret is declared unrecoverable."""


class SecureSumError(RuntimeError):
    """The protocol cannot go on (too few clients left, a malformed or replayed message)."""


def quantisation_bits(clients: int) -> int:
    """Bits per value (sign apart) such that the sum of ``clients`` values stays within int64: ``clients x 2^bits <= 2^62``."""
    if clients < 1:
        raise ValueError(f"a secure sum needs at least one client, got {clients}")
    return 62 - math.ceil(math.log2(clients + 1))


def quantise(arrays: list[np.ndarray], bounds: list[float], bits: int) -> tuple[list[np.ndarray], int]:
    """Each array clipped to ``+-bound`` and scaled to signed integers of ``bits`` bits (two's complement in
    uint64, so that sums modulo 2^64 are the signed sums); and how many values were clipped.

    Signed, not offset by the bound: ``x + bound`` in float64 would keep only ``bound``'s
    precision, losing ``log2(bound / |x|)`` bits of every small value.
    """
    out, clipped = [], 0
    for array, bound in zip(arrays, bounds, strict=True):
        x = np.asarray(array, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("a secure sum takes finite values only")
        clipped += int(np.count_nonzero(np.abs(x) > bound))
        scaled = np.rint(np.clip(x, -bound, bound) * (2.0**bits / bound))
        out.append(scaled.astype(np.int64).view(np.uint64))
    return out, clipped


def dequantise(totals: list[np.ndarray], bounds: list[float], bits: int) -> list[np.ndarray]:
    """The float sums of quantised contributions (each value within ``bound / 2^(bits + 1)`` of what was sent)."""
    return [np.asarray(t, dtype=np.uint64).view(np.int64).astype(np.float64) * (bound / 2.0**bits)
            for t, bound in zip(totals, bounds, strict=True)]


def mask_stream(seed: bytes, label: str, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform uint64 masks from the whole of ``seed`` (SHA-256 with the sum's label)."""
    digest = hashlib.sha256(seed + b"\x00" + label.encode()).digest()
    gen = np.random.PCG64(int.from_bytes(digest, "little"))
    return [gen.random_raw(int(np.prod(shape))).astype(np.uint64).reshape(shape) for shape in shapes]


def neighbours(nodes: list[int], share_num: int) -> dict[int, list[int]]:
    """SecAgg+'s ring: each node with the ``share_num`` nodes centred on it (itself included)."""
    ring = sorted(nodes)
    if share_num >= len(ring):
        return {n: ring for n in ring}
    half = share_num // 2
    return {ring[i]: sorted(ring[(i + j) % len(ring)] for j in range(-half, half + 1)) for i in range(len(ring))}


def _pack(parts: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


def _unpack(blob: bytes) -> list[bytes]:
    parts, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at:at + 4], "little")
        parts.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    return parts


@dataclass
class SecureSumClient:
    """One client's side of the protocol for one round (one setup, one masked vector per label).

    Its fields are bytes, ints and dicts of them, so the state can live in a ClientApp's
    context between the stages (:meth:`to_record` / :meth:`from_record`).
    """

    node: int
    labels: tuple[str, ...]
    threshold: int
    share_num: int
    enc_secret: bytes = b""
    enc_public: bytes = b""
    pair_secret: dict[str, bytes] = field(default_factory=dict)
    pair_public: dict[str, bytes] = field(default_factory=dict)
    seeds: dict[str, bytes] = field(default_factory=dict)
    peers: dict[int, dict[str, bytes]] = field(default_factory=dict)
    """Neighbours' public keys (``"enc"`` and one per label)."""
    held_shares: dict[int, dict[str, bytes]] = field(default_factory=dict)
    """Shares held for each neighbour (``"seed:<label>"``, ``"pair:<label>"``), own included."""
    revealed: dict[str, dict[int, str]] = field(default_factory=dict)
    """Per label, which share of each node was given to the server: never both kinds."""
    masked: set[str] = field(default_factory=set)

    # -- stage 1: keys ---------------------------------------------------------
    def setup(self) -> dict[str, bytes]:
        """Fresh key pairs: one for encrypting shares, one per sum for its pairwise masks."""
        secret, public = generate_key_pairs()
        self.enc_secret, self.enc_public = private_key_to_bytes(secret), public_key_to_bytes(public)
        for label in self.labels:
            secret, public = generate_key_pairs()
            self.pair_secret[label], self.pair_public[label] = private_key_to_bytes(secret), public_key_to_bytes(public)
        return {"enc": self.enc_public, **self.pair_public}

    # -- stage 2: shares ------------------------------------------------------
    def share_keys(self, public_keys: dict[int, dict[str, bytes]]) -> dict[int, bytes]:
        """Shamir shares of every seed and pairwise secret, encrypted for each neighbour.

        Once per round: fresh seeds after a vector was masked would let two masked vectors
        of one sum be compared.
        """
        if self.seeds:
            raise SecureSumError(f"node {self.node}: keys were already shared this round")
        if len(public_keys) < self.threshold:
            raise SecureSumError(f"node {self.node}: {len(public_keys)} neighbours, fewer than the threshold {self.threshold}")
        if public_keys.get(self.node) != {"enc": self.enc_public, **self.pair_public}:
            raise SecureSumError(f"node {self.node}: the server sent back other keys for this node")
        keys = [k for entry in public_keys.values() for k in entry.values()]
        if len(set(keys)) != len(keys):
            raise SecureSumError(f"node {self.node}: two neighbours share a public key")
        self.peers = public_keys
        self.seeds = {label: _random_seed() for label in self.labels}
        nodes = sorted(public_keys)
        shares: dict[str, list[bytes]] = {}
        for label in self.labels:
            shares[f"seed:{label}"] = create_shares(self.seeds[label], self.threshold, len(nodes))
            shares[f"pair:{label}"] = create_shares(self.pair_secret[label], self.threshold, len(nodes))
        out = {}
        names = sorted(shares)
        for index, peer in enumerate(nodes):
            mine = {name: shares[name][index] for name in names}
            if peer == self.node:
                self.held_shares[self.node] = mine
                continue
            plaintext = _pack([self.node.to_bytes(8, "little"), peer.to_bytes(8, "little"), *(n.encode() for n in names), *mine.values()])
            out[peer] = encrypt(self._channel(peer), plaintext)
        return out

    def commitments(self) -> dict[str, bytes]:
        """SHA-256 of each sum's private seed: the server checks the seed it rebuilds from shares against it."""
        return {label: seed_commitment(seed) for label, seed in self.seeds.items()}

    def _channel(self, peer: int) -> bytes:
        return generate_shared_key(bytes_to_private_key(self.enc_secret), bytes_to_public_key(self.peers[peer]["enc"]))

    def receive_shares(self, ciphertexts: dict[int, bytes]) -> None:
        """Decrypt the shares neighbours sent this node; check who they came from and were for."""
        for source, ciphertext in ciphertexts.items():
            if source not in self.peers or source == self.node:
                raise SecureSumError(f"node {self.node}: shares from {source}, not a neighbour")
            parts = _unpack(decrypt(self._channel(source), ciphertext))
            src, dst = int.from_bytes(parts[0], "little"), int.from_bytes(parts[1], "little")
            if (src, dst) != (source, self.node):
                raise SecureSumError(f"node {self.node}: shares of {src} for {dst} forwarded as from {source}")
            count = (len(parts) - 2) // 2
            names = [p.decode() for p in parts[2:2 + count]]
            self.held_shares[source] = dict(zip(names, parts[2 + count:], strict=True))

    # -- stage 3: the masked vector -------------------------------------------
    def mask(self, label: str, arrays: list[np.ndarray], bounds: list[float], bits: int) -> tuple[list[np.ndarray], int]:
        """``arrays`` quantised, plus its private mask and the pairwise masks of every neighbour that shared keys.

        Returns the masked uint64 arrays and the number of values clipped to their bounds.
        """
        if label not in self.labels or label in self.masked:
            raise SecureSumError(f"node {self.node}: sum {label!r} is not expected (or was already sent)")
        if len(self.held_shares) < self.threshold:
            raise SecureSumError(f"node {self.node}: shares from {len(self.held_shares)} nodes, fewer than the threshold {self.threshold}")
        self.masked.add(label)
        values, clipped = quantise(arrays, bounds, bits)
        shapes = [v.shape for v in values]
        for mask, value in zip(mask_stream(self.seeds[label], label, shapes), values):
            value += mask  # uint64: modulo 2^64
        for peer in self.held_shares:
            if peer == self.node:
                continue
            key = generate_shared_key(bytes_to_private_key(self.pair_secret[label]), bytes_to_public_key(self.peers[peer][label]))
            for mask, value in zip(mask_stream(key, label, shapes), values):
                if self.node > peer:
                    value += mask
                else:
                    value -= mask
        return values, clipped

    # -- stage 4: unmasking ---------------------------------------------------
    def unmask(self, label: str, survivors: list[int], dropped: list[int]) -> dict[int, bytes]:
        """Shares for the server: each survivor's seed, each dropped node's pairwise secret (of ``label``)."""
        if len(survivors) < self.threshold:
            raise SecureSumError(f"node {self.node}: {len(survivors)} survivors, fewer than the threshold {self.threshold}")
        if set(survivors) & set(dropped):
            raise SecureSumError(f"node {self.node}: nodes {sorted(set(survivors) & set(dropped))} both survived and dropped")
        finished_before = {n for other, given in self.revealed.items() if other != label for n, kind in given.items() if kind == "seed"}
        if set(dropped) & finished_before:
            # Two sums over different sets differ by the sketches of the missing: a node that finished one
            # sum and is left out of another would be revealed by the difference.
            raise SecureSumError(f"node {self.node}: nodes {sorted(set(dropped) & finished_before)} finished an earlier sum "
                                 f"and are missing from {label!r}; unmasking would reveal them by difference")
        given = self.revealed.setdefault(label, {})
        out = {}
        for node, kind in [*((n, "seed") for n in survivors), *((n, "pair") for n in dropped)]:
            if node not in self.held_shares:
                continue
            if given.get(node, kind) != kind:
                raise SecureSumError(f"node {self.node}: both kinds of share of node {node} asked for sum {label!r}")
            given[node] = kind
            out[node] = self.held_shares[node][f"{kind}:{label}"]
        return out


def seed_commitment(seed: bytes) -> bytes:
    return hashlib.sha256(b"fedlowrank-seed\x00" + seed).digest()


def _random_seed() -> bytes:
    return os.urandom(32)


@dataclass
class SecureSum:
    """The server's side of one sum: add masked vectors as they arrive, then unmask with the shares.

    Holds a running total of masked vectors and, once :meth:`unmask` ran, the sum: no
    array that depends on one client alone is kept.
    """

    label: str
    bounds: list[float]
    bits: int
    graph: dict[int, list[int]]
    public_keys: dict[int, dict[str, bytes]]
    threshold: int
    commitments: dict[int, dict[str, bytes]] = field(default_factory=dict)
    round_survivors: dict[str, list[int]] = field(default_factory=dict)
    """Shared by the round's sums (its setup's): the survivors of the first sum unmasked."""
    total: list[np.ndarray] | None = None
    contributors: list[int] = field(default_factory=list)
    clipped: int = 0

    def add(self, node: int, masked: list[np.ndarray], clipped: int) -> None:
        """One client's masked vector (checked against the declared shapes by the caller)."""
        if node in self.contributors:
            raise SecureSumError(f"sum {self.label!r}: node {node} sent twice")
        masked = [np.asarray(m, dtype=np.uint64) for m in masked]
        self.total = masked if self.total is None else [t + m for t, m in zip(self.total, masked, strict=True)]
        self.contributors.append(node)
        self.clipped += int(clipped)

    def request(self) -> tuple[list[int], list[int]]:
        """``(survivors, dropped)``: who sent a vector, and which of the nodes that shared keys did not.

        Every sum of a round is over the nodes of the first one unmasked: a node that finished an
        earlier sum and is missing from this one would be revealed by the difference of the two
        (``SecureSumError``; clients refuse such a request too).
        """
        survivors = sorted(self.contributors)
        dropped = sorted(set(self.graph) - set(survivors))
        first = self.round_survivors.get("first")
        if first is not None and set(first) & set(dropped):
            raise SecureSumError(f"sum {self.label!r}: node(s) {sorted(set(first) & set(dropped))} finished an earlier sum "
                                 "and dropped before this one; unmasking would reveal them by difference: the round is abandoned")
        return survivors, dropped

    def unmask(self, shares: dict[int, dict[int, bytes]]) -> list[np.ndarray]:
        """The sum over the contributors, from each responding node's shares (``{responder: {node: share}}``).

        Raises :class:`SecureSumError` when some mask cannot be removed (fewer than
        ``threshold`` shares of it came back).
        """
        if self.total is None:
            raise SecureSumError(f"sum {self.label!r}: no client sent a vector")
        survivors, dropped = self.request()
        collected: dict[int, list[bytes]] = {}
        for responder, given in shares.items():
            for node, share in given.items():
                if responder in self.graph.get(node, ()):
                    collected.setdefault(node, []).append(share)
        shapes = [t.shape for t in self.total]
        total = [t.copy() for t in self.total]
        for node in survivors:
            for mask, value in zip(mask_stream(self._secret(node, collected, "seed"), self.label, shapes), total):
                value -= mask
        survivors_set = set(survivors)
        for node in dropped:
            # Only the masks it shares with a survivor are in the total: remove them with its pairwise secret.
            active = [peer for peer in self.graph[node] if peer in survivors_set]
            if not active:
                continue
            secret = self._secret(node, collected, "pair")
            for peer in active:
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(self.public_keys[peer][self.label]))
                for mask, value in zip(mask_stream(key, self.label, shapes), total):
                    if peer > node:  # the survivor added it
                        value -= mask
                    else:
                        value += mask
        self.total = None  # the masked total is of no further use
        self.round_survivors.setdefault("first", survivors)
        sums = dequantise(total, self.bounds, self.bits)
        # Honest clients clip to the bound: a sum beyond contributors x bound carries a value no honest client
        # sends (a masked vector cannot be checked alone). Refused, so no client moves the global without bound.
        for index, (values, bound) in enumerate(zip(sums, self.bounds)):
            if values.size and float(np.max(np.abs(values))) > len(survivors) * bound * (1 + 1e-9):
                raise SecureSumError(f"sum {self.label!r}: array {index} exceeds what {len(survivors)} clients within "
                                     f"+-{bound:g} can give; a client sent values outside the bound: the sum is refused")
        return sums

    def _secret(self, node: int, collected: dict[int, list[bytes]], kind: str) -> bytes:
        """Rebuild a node's seed (checked against its commitment) or pairwise secret (checked against its
        public key) from ``threshold`` shares; a bad share (a dishonest client) costs another subset, not the server."""
        got = collected.get(node, [])
        if len(got) < self.threshold:
            raise SecureSumError(f"sum {self.label!r}: {len(got)} shares of node {node}'s mask came back, {self.threshold} needed")
        for subset in itertools.islice(itertools.combinations(got, self.threshold), MAX_SHARE_SUBSETS):
            try:
                secret = combine_shares(list(subset))
                if kind == "seed" and seed_commitment(secret) == self.commitments[node][self.label]:
                    return secret
                if kind == "pair" and public_key_to_bytes(bytes_to_private_key(secret).public_key()) == self.public_keys[node][self.label]:
                    return secret
            except Exception:  # noqa: BLE001  (a malformed share is one more subset to try)
                continue
        raise SecureSumError(f"sum {self.label!r}: no {self.threshold} of the {len(got)} shares of node {node} rebuild its "
                             f"{'seed' if kind == 'seed' else 'pairwise secret'} (a client sent bad shares)")


@dataclass
class SecureSetup:
    """The server's routing of keys and shares for one round; makes a :class:`SecureSum` per label.

    Parameters
    ----------
    nodes : list of int
        The sampled nodes.
    labels : tuple of str
        The round's sums, in order.
    share_num : int
        Neighbours per node, itself included (odd; SecAgg+'s ``num_shares``). At least the
        number of nodes: every node neighbours every other (SecAgg).
    threshold : int
        Shares needed to rebuild a seed or key; also the fewest neighbours a node may have
        left at any stage. Tolerates up to ``share_num - threshold`` dropped neighbours per
        node, and a server that colludes with fewer than ``threshold`` clients learns nothing.
    """

    nodes: list[int]
    labels: tuple[str, ...]
    share_num: int
    threshold: int
    graph: dict[int, list[int]] = field(init=False)
    public_keys: dict[int, dict[str, bytes]] = field(default_factory=dict)
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)
    """``{destination: {source: ciphertext}}``"""
    shared: set[int] = field(default_factory=set)
    commitments: dict[int, dict[str, bytes]] = field(default_factory=dict)
    round_survivors: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("a node is sampled twice")
        if not 2 <= self.threshold <= min(self.share_num, len(self.nodes)):
            raise ValueError(f"threshold {self.threshold} must be in [2, min(share_num, nodes) = {min(self.share_num, len(self.nodes))}]")
        self.graph = neighbours(list(self.nodes), self.share_num)

    def setup_config(self) -> dict[str, object]:
        return {"labels": list(self.labels), "threshold": self.threshold, "share-num": self.share_num}

    def add_keys(self, node: int, keys: dict[str, bytes]) -> None:
        """A node's public keys (stage 1); malformed keys or an unknown node: ``ValueError``."""
        if node not in self.graph:
            raise ValueError(f"keys from node {node}, which was not sampled")
        if set(keys) != {"enc", *self.labels} or not all(isinstance(k, bytes) and 0 < len(k) <= 512 for k in keys.values()):
            raise ValueError(f"node {node}: public keys must be 'enc' and {list(self.labels)}, as bytes")
        for key in keys.values():
            try:
                bytes_to_public_key(key)
            except Exception:  # noqa: BLE001  (any unparsable key is the same refusal)
                raise ValueError(f"node {node}: a public key that does not parse") from None
        seen = {k for entry in self.public_keys.values() for k in entry.values()}
        if len(set(keys.values())) != len(keys) or seen & set(keys.values()):
            raise ValueError(f"node {node}: a public key already in use (its own twice, or another node's)")
        self.public_keys[node] = dict(keys)

    def keys_for(self, node: int) -> dict[int, dict[str, bytes]]:
        """The public keys of ``node``'s neighbours that sent theirs (itself included)."""
        return {peer: self.public_keys[peer] for peer in self.graph[node] if peer in self.public_keys}

    def add_shares(self, node: int, ciphertexts: dict[int, bytes], commitments: dict[str, bytes]) -> None:
        """A node's encrypted shares (stage 2), kept for their destinations until forwarded, and its seeds' commitments."""
        if node not in self.public_keys:
            raise ValueError(f"shares from node {node}, which sent no keys")
        if set(commitments) != set(self.labels) or not all(isinstance(c, bytes) and len(c) == 32 for c in commitments.values()):
            raise ValueError(f"node {node}: one 32-byte seed commitment per sum {list(self.labels)} is needed")
        if not all(isinstance(c, bytes) and len(c) <= 4096 for c in ciphertexts.values()):
            raise ValueError(f"node {node}: encrypted shares must be bytes of at most 4096")
        allowed = set(self.keys_for(node)) - {node}
        if set(ciphertexts) != allowed:
            raise ValueError(f"node {node}: shares for {sorted(ciphertexts)}, expected {sorted(allowed)}")
        for destination, ciphertext in ciphertexts.items():
            self.ciphertexts.setdefault(destination, {})[node] = ciphertext
        self.commitments[node] = dict(commitments)
        self.shared.add(node)

    @property
    def sharing(self) -> list[int]:
        """The nodes that sent shares: the only ones that mask (and are unmasked) this round."""
        return sorted(self.shared)

    def shares_for(self, node: int) -> dict[int, bytes]:
        """The ciphertexts addressed to ``node`` from nodes that sent shares."""
        sharing = set(self.sharing)
        return {source: ct for source, ct in self.ciphertexts.get(node, {}).items() if source in sharing}

    def secure_sum(self, label: str, bounds: list[float]) -> SecureSum:
        """The server side of sum ``label`` over the nodes that shared keys."""
        sharing = set(self.sharing)
        graph = {n: [p for p in self.graph[n] if p in sharing] for n in sharing}
        return SecureSum(label, list(bounds), quantisation_bits(len(sharing)), graph, self.public_keys, self.threshold,
                         self.commitments, self.round_survivors)
