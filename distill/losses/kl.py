"""Temperature-softened KL divergence on rows of logits: the kernel shared by KD and LD.

All kernels take flattened rows ``(R, K)`` — K bins of one box edge (LD) or K classes (KD) — and
return one value per row, ``(R,)``, in fp32. Conventions follow the official LD code so that the
published loss weights apply (ld-gfl-spec §2.2):

- forward KL, teacher is the target: ``KL(p_T || q_S)``;
- **mean** over the K entries of a row (not the sum);
- multiplied by ``T**2`` so gradient magnitudes stay comparable across temperatures.

The teacher side is always detached. :func:`weighted_sum` turns row values into the scalar loss with
per-row weights and an explicit normaliser (a count, a sum of weights, or a legacy constant).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.distributed import mean_over_ranks
from distill.ops.precision import compute_dtype


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """(R, K), (R, K) -> (R,): ``T^2 * mean_k p_k (log p_k - log q_k)``, p = softmax(t/T), q = softmax(s/T).

    With K = 1 both distributions are the constant 1 and the result is exactly 0.
    """
    log_q = F.log_softmax(student_logits.to(compute_dtype()) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(compute_dtype()) / temperature, dim=-1)
    # log-space target: exp(log_p) * (log_p - log_q) is exactly 0 for identical rows and stays finite
    # when a teacher probability underflows (exp(-huge) = 0 times a finite difference).
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    return kl.mean(dim=-1) * temperature**2


def softmax_kl_to_probs(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Like :func:`softmax_kl` with the teacher already given as a distribution (R, K).

    Used when the teacher distribution was resampled to the student's bins and may contain exact
    zeros; ``kl_div`` uses ``xlogy`` so ``0 * log 0`` counts as 0.
    """
    log_q = F.log_softmax(student_logits.to(compute_dtype()) / temperature, dim=-1)
    kl = F.kl_div(log_q, teacher_probs.detach().to(compute_dtype()), reduction="none")
    return kl.mean(dim=-1) * temperature**2


def binary_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """(R, C), (R, C) -> (R,): ``T^2 * mean_c KL(Bern(sigmoid(t_c/T)) || Bern(sigmoid(s_c/T)))``.

    The per-class binary KL matches sigmoid-trained (GFL/QFL) class scores and, unlike the softmax
    over classes, is informative with a single class.
    """
    s = student_logits.to(compute_dtype()) / temperature
    t = teacher_logits.detach().to(compute_dtype()) / temperature
    # p and 1 - p from sigmoid(+-t) and every log from logsigmoid: no log(0) and no 1 - p cancellation
    # even for logits of +-1e4.
    kl = torch.sigmoid(t) * (F.logsigmoid(t) - F.logsigmoid(s)) + torch.sigmoid(-t) * (
        F.logsigmoid(-t) - F.logsigmoid(-s)
    )
    return kl.mean(dim=-1) * temperature**2


def weighted_sum(row_loss: Tensor, weights: Tensor, normalizer: Tensor | float) -> Tensor:
    """``sum_r w_r * loss_r / normalizer`` as a () fp32 tensor.

    row_loss, weights: (R,). Exactly 0 when there are no rows or all weights are 0, also for a
    normaliser of 0 (then the numerator is 0 too), so empty regions never produce NaN.
    """
    total = (row_loss * weights.to(compute_dtype())).sum()
    normalizer = torch.as_tensor(normalizer, dtype=compute_dtype(), device=total.device)
    normalizer = mean_over_ranks(normalizer)  # DDP: the global normaliser, see distill.distributed
    return total / normalizer.clamp(min=torch.finfo(torch.float32).tiny)
