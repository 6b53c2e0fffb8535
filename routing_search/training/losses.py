"""Deprecated location: the per-example losses live in :mod:`routing_search.losses`."""

from ..losses import LOSS_KINDS, bce_with_logits_loss, cross_entropy_loss, mse_loss, multitask_loss

__all__ = ["mse_loss", "bce_with_logits_loss", "cross_entropy_loss", "multitask_loss", "LOSS_KINDS"]
