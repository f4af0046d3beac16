"""The answer report a device sends with its update: is the personal head better than the global one for its user?

Aggregates only, no audio and no per-answer data: how many of the user's answers were scored, and how many
of them the personal head and the global head got right. The aggregator shows them per device and across the
fleet (the admin console's "personal against global").

Which answers are scored
    Only answers that say what the right label was (a thumbs-up, or a picked label); a thumbs-down says the
    prediction was wrong but not what was right. Of those, only the ones personalisation held back to guard
    itself (every ``holdout_every``-th answer, the same slice :meth:`edge_sdk.device.Device.personalize`
    holds back), so the personal head is scored on answers it did not train on. With
    ``TrainPolicy.refit_on_all`` the personal head did train on them, so nothing is scored (the report
    says 0 answers rather than an in-sample figure).

When the device is not personalised, its "personal" head is the global one and both counts are equal.

With ``TrainPolicy.guard_folds > 1`` (cross-validated personalisation) the device sends the out-of-fold counts
that personalisation computed instead (:meth:`edge_sdk.device.Device._cv_answer_report`); this module is the
held-back path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["answer_report", "scored_answers"]


def scored_answers(examples: Sequence, *, holdout_every: int, refit_on_all: bool = False) -> list:
    """The examples the report scores (see the module docstring): held back, with a known label."""
    if holdout_every <= 0 or refit_on_all:
        return []
    return [e for i, e in enumerate(examples) if i % holdout_every == holdout_every - 1 and e.sign > 0]


def answer_report(model, global_head: Mapping[str, np.ndarray], examples: Sequence, *, holdout_every: int,
                  refit_on_all: bool = False) -> dict[str, int]:
    """``{"answers_scored", "personal_correct", "global_correct"}`` for the update header.

    ``model``: a :class:`edge_sdk.model.TFLiteModel` holding the head in use (the personal one when the device is
    personalised); its weights are the same when this returns. ``examples``: all of the user's
    :class:`edge_sdk.store.FeedbackExample` s, oldest first (the order personalisation uses).
    """
    scored = scored_answers(examples, holdout_every=holdout_every, refit_on_all=refit_on_all)
    if not scored:
        return {"answers_scored": 0, "personal_correct": 0, "global_correct": 0}
    labels = list(model.metadata.labels)
    emb = np.stack([e.embedding for e in scored]).astype(np.float32)
    truth = np.array([labels.index(e.target) for e in scored])
    in_use = model.get_weights()
    try:
        personal = np.argmax(model.head_probs(emb), axis=1)
        model.set_weights(dict(global_head))
        global_ = np.argmax(model.head_probs(emb), axis=1)
    finally:
        model.set_weights(in_use)
    return {"answers_scored": len(scored), "personal_correct": int(np.sum(personal == truth)),
            "global_correct": int(np.sum(global_ == truth))}
