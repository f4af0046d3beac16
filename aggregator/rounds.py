"""Closing a round: FedAvg of its accepted deltas, published as the next version.

A close is one database transaction: claim the open round, average its
updates, publish the new version, open the next round. A crash anywhere
before the commit leaves the round open with every update in it; after the
commit it is closed exactly once. A second worker racing to close the same
round finds it no longer open and does nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from aggregator.db import ModelVersion, Round, Update
from aggregator.fedavg import WeightedMean, apply_delta
from aggregator.registry import BlobStore, head_arrays, load_manifest, publish_version
from edge_sdk.signing import SigningKey
from edge_sdk.wire import unpack_arrays

log = logging.getLogger("aggregator")

__all__ = ["CloseResult", "close_round", "open_round"]


@dataclass(frozen=True)
class CloseResult:
    round_id: int
    closed: bool
    reason: str = ""
    num_updates: int = 0
    num_examples: int = 0
    published_version: int | None = None


def open_round(session: Session, *, lock: bool = False) -> Round | None:
    """The open round of the current version, if any.

    With ``lock``, the round row stays share-locked until the transaction ends: a concurrent
    :func:`close_round` (which updates the row) waits for the caller's insert, or the caller sees
    the round closed. Without it, PostgreSQL's READ COMMITTED could let an update land in a round
    that was aggregated a moment before.
    """
    query = (select(Round).join(ModelVersion, ModelVersion.version == Round.base_version)
             .where(ModelVersion.is_current.is_(True), Round.status == "open"))
    if lock:
        query = query.with_for_update(read=True, of=Round)
    return session.scalars(query).first()


def close_round(session: Session, blobs: BlobStore, key: SigningKey, round_id: int, *,
                min_updates: int = 1, server_lr: float = 1.0) -> CloseResult:
    """Aggregate round ``round_id`` and publish the result; commits on success."""
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
    mean = WeightedMean()
    # Stream the bodies: one update in memory at a time.
    for body, n in session.execute(
        select(Update.body, Update.num_examples).where(Update.round_id == round_id).order_by(Update.update_id)
        .execution_options(yield_per=64)
    ):
        mean.add(unpack_arrays(layout, body), n)
    if mean.count < min_updates:
        session.rollback()
        return CloseResult(round_id, False, f"{mean.count} updates, at least {min_updates} needed",
                           num_updates=mean.count)
    new_head = apply_delta(head_arrays(blobs, manifest), mean.result(), server_lr=server_lr)
    new = publish_version(
        session, blobs, key, base=manifest.base, head=new_head, metadata=manifest.metadata,
        parent_version=manifest.version, round_id=round_id,
        metrics={"round_updates": mean.count, "round_examples": mean.total_weight},
    )
    rnd.status, rnd.closed_at = "closed", time.time()
    rnd.num_updates, rnd.num_examples, rnd.published_version = mean.count, mean.total_weight, new.version
    session.commit()
    log.info("closed round %d: %d updates, %d examples -> version %d", round_id, mean.count,
             mean.total_weight, new.version)
    return CloseResult(round_id, True, "", mean.count, mean.total_weight, new.version)
