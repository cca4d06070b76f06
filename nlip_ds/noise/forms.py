"""The forms of L_NITC, the noise-adaptive contrastive loss: one table, the only place a form is named.

Kept free of torch so that config.py can take `noise.nitc_mode`'s choices from it at no import cost. The
`NoiseEstimator` (estimator.py) computes the chosen form; docs/noise.md describes each. A form is the target form
of the fused contrastive op (nlip_ds/ops/contrastive.py, whose math stays there) that receives ω, plus
optionally the penalty term of harmonize.py. Adding a form that the op already computes is one row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class NITCForm:
    """How ω = λ·ε enters the contrastive loss."""

    name: str
    doc: str
    op_form: Optional[str]  # the fused op's `form` that takes ω; None runs the op without ω (plain CLIP)
    penalty: bool = False  # add μ·mean_i ω_i·s_ii (noise.penalty_mu), harmonize.penalty_term


NITC_FORMS = {form.name: form for form in (
    NITCForm("soft_target", "targets move ω_i of a pair's mass from its own caption to the others (the "
             "method's L_NITC)", op_form="soft_target"),
    NITCForm("reweight", "each pair's loss times 1 - ω_i", op_form="reweight"),
    NITCForm("penalty", "plain CLIP loss plus μ·mean_i ω_i·s_ii, which lowers the similarity of likely-noisy "
             "pairs", op_form=None, penalty=True),
)}


def nitc_form(name: str) -> NITCForm:
    """The form called `name`; a ValueError lists the known ones."""
    if name not in NITC_FORMS:
        raise ValueError(f"unknown L_NITC form {name!r}; known: {', '.join(NITC_FORMS)}")
    return NITC_FORMS[name]
