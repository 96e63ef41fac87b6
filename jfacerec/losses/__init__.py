"""Losses: the loss functions and their registry, the objective a config names, the sharded head.

- `functions`: each loss as a pure function of arrays, and `get_loss(name)`;
- `objectives`: `Objective`, a config's weighted sum of losses (`"0.7*softmax + 0.3*triplet"`);
- `sharded_softmax`: the softmax and margin heads with the class weights split over devices.

The loss functions are re-exported here: `from jfacerec import losses; losses.arcface_loss(...)`.
"""

from jfacerec.losses.functions import (CENTER, LOGITS, MARGIN, METRIC, TRIPLET_MINING,
                                       arcface_loss, arcface_target, center_loss, center_update,
                                       combined_margin_loss, combined_target, cosface_loss,
                                       cosface_target, cosine_logits, explicit_triplet_loss,
                                       get_loss, l2_normalize, loss_kind, softmax_cross_entropy,
                                       sphereface_loss, sphereface_psi, sphereface_row_scale,
                                       sphereface_target, triplet_loss)

__all__ = ["CENTER", "LOGITS", "MARGIN", "METRIC", "TRIPLET_MINING", "arcface_loss",
           "arcface_target", "center_loss", "center_update", "combined_margin_loss",
           "combined_target", "cosface_loss", "cosface_target", "cosine_logits",
           "explicit_triplet_loss", "get_loss", "l2_normalize", "loss_kind",
           "softmax_cross_entropy", "sphereface_loss", "sphereface_psi", "sphereface_row_scale",
           "sphereface_target", "triplet_loss"]
