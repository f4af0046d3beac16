"""Closing a round: aggregate its accepted deltas, gate the result, publish it as the next version.

A close is one database transaction: claim the open round, aggregate its
updates, publish the new version, open the next round. A crash anywhere
before the commit leaves the round open with every update in it; after the
commit it is closed exactly once. A second worker racing to close the same
round finds it no longer open and does nothing.

How the deltas are combined is a :class:`RoundPolicy` (from the app config),
applied by the pure functions of :mod:`aggregator.fedavg` (the one aggregation
path): example-weighted FedAvg with each self-reported count capped
(``MAX_EXAMPLES_WEIGHT``, ``MAX_EXAMPLES_WEIGHT_OVER_MEDIAN``) and staleness
down-weighting, streamed (memory does not grow with the number of updates), or
a coordinate-wise median / trimmed mean (in coordinate blocks of bounded
memory); optional per-update norm clipping; and a server optimizer (SGD =
FedAvg, FedAvgM, FedAdam, FedYogi) whose state is kept per version, server side.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from aggregator.db import ModelVersion, Round, Update
from aggregator.fedavg import AGGREGATION_METHODS, ServerOptimizer, aggregate, aggregation_weights, unflatten
from aggregator.registry import BlobStore, begin_durable, head_arrays, load_manifest, lock_rounds, publish_version
from edge_sdk.signing import SigningKey
from edge_sdk.wire import ArraySpec, HeadLayout, pack_arrays, unpack_arrays

log = logging.getLogger("aggregator")

__all__ = ["CloseResult", "RoundPolicy", "close_round", "open_round", "due_round",
           "AGGREGATION_METHODS"]


@dataclass(frozen=True)
class CloseResult:
    round_id: int
    closed: bool
    reason: str = ""
    num_updates: int = 0
    num_examples: int = 0
    published_version: int | None = None
    rejected: bool = False
    validation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RoundPolicy:
    """How a round is aggregated.

    Attributes
    ----------
    min_updates : int
        A close with fewer accepted updates does nothing.
    method : {"fedavg", "median", "trimmed_mean"}
    trim_fraction : float
        Share cut from each end, per coordinate, by ``trimmed_mean``.
    clip_norm : float
        Each delta is scaled down to this L2 norm before aggregation (0: off).
    optimizer : ServerOptimizer
    staleness_exponent : float
        An update ``s`` versions behind weighs ``n / (1 + s) ** exponent``.
    max_examples_weight : float
        An update's self-reported example count weighs at most this much (0: no absolute cap).
    max_examples_weight_over_median : float
        ... and at most this multiple of the round's (lower) median count (0: no relative cap).
    memory_bytes : int
        Bound of the coordinate blocks of the robust methods.
    """

    min_updates: int = 1
    method: str = "fedavg"
    trim_fraction: float = 0.1
    clip_norm: float = 0.0
    optimizer: ServerOptimizer = ServerOptimizer()
    staleness_exponent: float = 0.5
    max_examples_weight: float = 1000.0
    max_examples_weight_over_median: float = 1.0
    memory_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.method not in AGGREGATION_METHODS:
            raise ValueError(f"unknown aggregation method {self.method!r}; choose one of {AGGREGATION_METHODS}")
        if self.min_updates < 1:
            raise ValueError("min_updates must be at least 1")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"TRIM_FRACTION must be in [0, 0.5), got {self.trim_fraction}")
        if self.max_examples_weight < 0 or self.max_examples_weight_over_median < 0 or self.clip_norm < 0:
            raise ValueError("MAX_EXAMPLES_WEIGHT, MAX_EXAMPLES_WEIGHT_OVER_MEDIAN and CLIP_NORM must be >= 0")

    @classmethod
    def from_config(cls, cfg, *, min_updates: int | None = None) -> RoundPolicy:
        def num(key: str, convert=float):
            """A setting as a number; one that is not names itself (ValueError)."""
            try:
                return convert(cfg[key])
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {cfg[key]!r:.80}") from None

        return cls(
            min_updates=int(min_updates) if min_updates is not None else num("ROUND_MIN_UPDATES", int),
            method=str(cfg["AGGREGATION"]), trim_fraction=num("TRIM_FRACTION"),
            clip_norm=num("CLIP_NORM"), staleness_exponent=num("STALENESS_EXPONENT"),
            max_examples_weight=num("MAX_EXAMPLES_WEIGHT"),
            max_examples_weight_over_median=num("MAX_EXAMPLES_WEIGHT_OVER_MEDIAN"),
            optimizer=ServerOptimizer(kind=str(cfg["SERVER_OPTIMIZER"]),
                                      lr=None if cfg.get("SERVER_LR") in (None, "") else num("SERVER_LR"),
                                      momentum=num("SERVER_MOMENTUM"), beta1=num("SERVER_BETA1"),
                                      beta2=num("SERVER_BETA2"), tau=num("SERVER_TAU")))

    def describe(self) -> dict:
        return {"method": self.method, "trim_fraction": self.trim_fraction, "clip_norm": self.clip_norm,
                "optimizer": self.optimizer.kind, "server_lr": self.optimizer.lr,
                "max_examples_weight": self.max_examples_weight,
                "max_examples_weight_over_median": self.max_examples_weight_over_median}


def open_round(session: Session) -> Round | None:
    """The open round of the current version, if any (the intake reads it share-locked: aggregator.intake)."""
    return session.scalars(select(Round).join(ModelVersion, ModelVersion.version == Round.base_version)
                           .where(ModelVersion.is_current.is_(True), Round.status == "open")).first()


def due_round(session: Session, now: float, min_updates: int) -> Round | None:
    """The open round whose deadline has passed and that holds at least ``min_updates``, if any."""
    rnd = open_round(session)
    if rnd is None or rnd.deadline_at is None or rnd.deadline_at > now:
        return None
    count = session.scalar(select(func.count()).select_from(Update).where(Update.round_id == rnd.id))
    return rnd if count >= min_updates else None


def _optimizer_layout(layout: HeadLayout, kind: str) -> HeadLayout | None:
    prefixes = {"sgd": (), "fedavgm": ("m",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}[kind]
    if not prefixes:
        return None
    return HeadLayout([ArraySpec(f"{p}.{s.name}", s.shape) for p in prefixes for s in layout])


def close_round(session: Session, blobs: BlobStore, key: SigningKey, round_id: int, *,
                policy: RoundPolicy = RoundPolicy(), gate: Callable | None = None,
                before_commit: Callable[[int], None] | None = None) -> CloseResult:
    """Aggregate round ``round_id`` and publish the result; commits on success.

    ``gate(manifest, new_head)`` may refuse the candidate: it returns
    ``(ok, detail dict)``. A refused round is marked ``rejected`` (its updates
    stay on record, counted once) and a new round opens on the same version.
    ``before_commit(round_id)`` runs after the new version is written and
    before the commit (the crash tests' fault injection; None in production).
    On SQLite, call it with no transaction begun, so that its commit is synced (:func:`begin_durable`).
    """
    begin_durable(session)  # SQLite: the commit that publishes is synced (before the transaction's first statement)
    lock_rounds(session)  # before the claim: a concurrent publish waits for this close's new round
    claimed = session.execute(
        update(Round).where(Round.id == round_id, Round.status == "open").values(status="closing")
    ).rowcount
    if claimed != 1:
        session.rollback()
        return CloseResult(round_id, False, "round is not open")
    rnd = session.get(Round, round_id)
    base_row = session.get(ModelVersion, rnd.base_version)
    manifest = load_manifest(base_row, key)
    layout = manifest.metadata.head_layout
    shapes = {s.name: tuple(s.shape) for s in layout}

    total = sum(int(np.prod(s.shape)) if s.shape else 1 for s in layout)
    # Every pass reads the updates in one order (their key), so that the k-th body gets the k-th weight.
    counts = session.execute(select(Update.num_examples, Update.base_version).where(Update.round_id == round_id)
                             .order_by(Update.update_id)).all()
    if len(counts) < policy.min_updates:
        session.rollback()
        return CloseResult(round_id, False, f"{len(counts)} updates, at least {policy.min_updates} needed",
                           num_updates=len(counts))
    examples = sum(int(n) for n, _ in counts)
    weights, capped = aggregation_weights([n for n, _ in counts], [rnd.base_version - b for _, b in counts],
                                          max_examples=policy.max_examples_weight,
                                          median_multiple=policy.max_examples_weight_over_median,
                                          staleness_exponent=policy.staleness_exponent)

    def bodies():
        """Each update as one flat float32 vector (the body is the layout's arrays, little-endian, in order)."""
        rows = session.execute(select(Update.body).where(Update.round_id == round_id).order_by(Update.update_id)
                               .execution_options(yield_per=256))
        for (body,) in rows:  # one update in memory at a time
            yield np.frombuffer(body, "<f4", count=total)

    agg = aggregate(bodies, weights, total, method=policy.method, clip_norm=policy.clip_norm,
                    trim_fraction=policy.trim_fraction, memory_bytes=policy.memory_bytes)
    num_updates = agg.num_updates
    if capped:
        agg.notes.append(f"{capped} of {num_updates} updates claimed more examples than the cap and were "
                         "weighed at the cap")
    for note in agg.notes:
        log.warning("round %d: %s", round_id, note)
    aggregate_arrays = unflatten(agg.delta, shapes)
    state = {}
    opt_layout = _optimizer_layout(layout, policy.optimizer.kind)
    if base_row.optimizer_state_sha256 and opt_layout is not None:
        try:
            state = unpack_arrays(opt_layout, blobs.get(base_row.optimizer_state_sha256))
        except Exception as exc:  # another optimizer's state (the config changed): start afresh
            log.warning("optimizer state of version %d unusable (%s); starting from zero", base_row.version, exc)
    new_head, new_state = policy.optimizer.step(head_arrays(blobs, manifest), aggregate_arrays, state)
    validation = {}
    if gate is not None:
        ok, validation = gate(manifest, new_head)
        if not ok:
            now = time.time()
            rnd.status, rnd.closed_at, rnd.num_updates, rnd.num_examples = "rejected", now, num_updates, examples
            rnd.note = validation.get("reason", "refused by the validation gate")[:500]
            rnd.gate_report = json.dumps(validation, default=str)[:20000]  # the figures, for the console
            session.add(Round(base_version=rnd.base_version, status="open", opened_at=now,
                              deadline_at=(now + (rnd.deadline_at - rnd.opened_at)) if rnd.deadline_at else None))
            session.commit()
            log.warning("round %d rejected by the validation gate: %s", round_id, rnd.note)
            return CloseResult(round_id, True, rnd.note, num_updates, examples, None, True, validation)
    state_sha = blobs.put(pack_arrays(opt_layout, new_state), session).sha256 if opt_layout is not None else None
    metrics = {"round_updates": num_updates, "round_examples": examples, "aggregation": policy.describe(),
               "capped_counts": capped, "clipped_updates": agg.clipped,
               "base_test": manifest.metrics.get("base_test") or {
                   k: manifest.metrics[k] for k in ("accuracy", "uar", "macro_f1") if k in manifest.metrics}}
    if agg.trimmed_per_end is not None:
        metrics["trimmed_per_end"] = agg.trimmed_per_end
    if agg.notes:
        metrics["notes"] = agg.notes
    if validation:
        metrics["validation"] = validation
    new = publish_version(
        session, blobs, key, base=manifest.base, head=new_head, metadata=manifest.metadata,
        parent_version=manifest.version, round_id=round_id, metrics=metrics,
        optimizer_state_sha256=state_sha,
        deadline_seconds=(rnd.deadline_at - rnd.opened_at) if rnd.deadline_at else None,
    )
    if before_commit is not None:
        before_commit(round_id)
    rnd.status, rnd.closed_at = "closed", time.time()
    rnd.num_updates, rnd.num_examples, rnd.published_version = num_updates, examples, new.version
    rnd.note = "; ".join(agg.notes)[:500]
    session.commit()
    log.info("closed round %d: %d updates, %d examples -> version %d", round_id, num_updates, examples, new.version)
    return CloseResult(round_id, True, "", num_updates, examples, new.version, False, validation)
