"""MoE load-balancing loss gradients with per-token loss under TP (sequence parallel) and CP.

Megatron-Core 0.16.1's router (transformer/moe/router.py:416-463,
`TopKRouter.attach_and_log_load_balancing_loss`) computes the "aux_loss"/"seq_aux_loss" on each rank's own
tokens with token counts reduced over the TP x CP group, so every rank holds a *partial* sum of the sequence's
loss. With `calculate_per_token_loss` it scales that partial by the rank's local token count, and
finalize_model_grads divides by the global token count; the partials of the tp*cp ranks then add up to aux *
s/(tp*cp) where one process has aux * s. The schedule's other path (schedules.py:292, loss not per token)
multiplies by cp for exactly this reason; the per-token path (schedules.py:290) does not. Measured on the
matrix test: router gradients 1/2 (tp2 or cp2) and 1/4 (tp2 cp2) of the 1-process ones.

The fix scales by the token count of the whole reduce group (local count x group size), so the router gradient
equals the 1-process one for any TP/CP. The global aux loss (reduced over TP x DP x CP) is left unchanged.
"""
from __future__ import annotations

_INSTALLED = False


def install() -> None:
    """Patch the router once per process (idempotent); a no-op for losses without per-token scaling."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.transformer.moe import router as moe_router

    cls = moe_router.TopKRouter
    orig = cls.attach_and_log_load_balancing_loss

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        size = reduce_group.size() if reduce_group is not None else 1
        if self.calculate_per_token_loss and not reduce_group_has_dp and size > 1 \
                and reduce_group is getattr(self, "tp_cp_group", None):
            n = valid_token_count if valid_token_count is not None else activation.shape[0]
            valid_token_count = n * size
        return orig(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                    reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    cls.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
    _INSTALLED = True
