"""Binary Bernoulli diffusion (BBDM) of HiDiff: schedules, forward process, posterior, samplers, loss.

Reference: T. Chen, C. Wang, Z. Chen, Y. Lei, H. Shan, "HiDiff: Hybrid Diffusion Framework
for Medical Image Segmentation", IEEE TMI 2024 (arXiv 2407.03548); spec: ``specs/hidiff.md`` §1.

Conventions used by every function here:

- Masks, priors and probabilities are float tensors ``[B, K, *spatial]`` with values in
  ``[0, 1]``. The ``K`` channels (background included for multi-class data) are **independent**
  Bernoulli variables; nothing forces them to sum to one.
- ``y0`` is the clean mask, ``p`` the segmentor prior, ``y_k`` the state at step ``k``.
- Step indices are the code's ``k in {0, ..., T-1}``; ``k = 0`` is the least noisy step.
  ``alpha_bar[k]`` is the product of ``alpha[0..k]``; by convention ``alpha_bar[-1] = 1``
  (``y_{-1}`` is ``y0`` itself), which is how the posterior at ``k = 0`` is defined (no
  wrap-around to the last table entry).
- A step argument ``k`` is either a Python ``int`` (the whole batch at one step) or a long
  tensor ``[B]`` (one step per sample).
- The refiner's output is handled as **logits** of the flip probability ``eps_hat``
  (``sigmoid(logits)`` is the probability that a bit of ``y_k`` differs from ``y0``).
- Random draws take an optional ``torch.Generator`` (on the tensors' device), so seeded
  calls are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "BBDM",
    "BernoulliSchedule",
    "EnsembleResult",
    "bernoulli_kl",
    "labels_from_probabilities",
    "mask_to_channels",
    "prior_from_logits",
    "soften_prior",
]

Step = Union[int, torch.Tensor]
# model_fn(y_k[B,K,...] in {0,1}, k[B] long) -> eps-hat logits [B,K,...]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LN2 = math.log(2.0)


def prior_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Segmentor logits ``[B, K, ...]`` -> prior ``p`` in ``[0, 1]`` of the same shape.

    Softmax over the channel axis when ``K > 1``; sigmoid when ``K = 1`` (a softmax over a
    single channel would be identically 1 and make the diffusion degenerate).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [B, K, ...], got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def soften_prior(prior: torch.Tensor, mask: torch.Tensor, weight: float = 0.5, eps: float = 0.02) -> torch.Tensor:
    """Blend a segmentor prior with a (corrected) mask: ``(1-w)·p + w·clip(m, eps, 1-eps)``.

    ``prior`` and ``mask`` are ``[B, K, ...]`` in ``[0, 1]``. The result stays strictly inside
    ``(0, 1)`` when ``eps > 0`` and ``weight < 1``; a hard 0/1 prior would freeze the chain.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    if prior.shape != mask.shape:
        raise ValueError(f"prior {tuple(prior.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return (1.0 - weight) * prior + weight * mask.to(prior.dtype).clamp(eps, 1.0 - eps)


def mask_to_channels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer label map ``[B, ...]`` -> float mask ``[B, K, ...]`` in ``{0, 1}``.

    ``num_classes = 1``: the single channel is ``labels > 0``. ``num_classes > 1``: one-hot
    with background as channel 0; labels outside ``[0, K)`` raise ``ValueError``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = labels.long()
    if num_classes == 1:
        return (labels > 0).unsqueeze(1).float()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    onehot = F.one_hot(labels, num_classes).float()
    return onehot.movedim(-1, 1).contiguous()


def labels_from_probabilities(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Refined probabilities ``[B, K, ...]`` -> integer labels ``[B, ...]`` (int64).

    ``K = 1``: ``prob > threshold`` (0/1). ``K > 1``: argmax over the channels (a
    recommendation; the paper's multi-class rule is not published).
    """
    if prob.shape[1] == 1:
        return (prob[:, 0] > threshold).long()
    return prob.argmax(dim=1)


def bernoulli_kl(q: torch.Tensor, p: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Elementwise ``KL(B(q) || B(p))`` in nats; ``p`` is clamped to ``[eps, 1-eps]``, ``0·log 0 = 0``."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.xlogy(q, q) - q * torch.log(p) + torch.xlogy(1.0 - q, 1.0 - q) - (1.0 - q) * torch.log1p(-p)


class BernoulliSchedule:
    """Cosine noise schedule of the BBDM, held in float64.

    ``beta_k = min(1 - f((k+1)/T) / f(k/T), max_beta)`` with ``f(u) = cos(((u+s)/(1+s))·π/2)``
    for ``kind="cosine"`` (HiDiff's name; **not** squared) and ``f(u)**2`` for
    ``kind="cosine2"`` (Nichol & Dhariwal's squared cosine). Which one the paper used is not
    published, so the choice is explicit (no default).

    Args:
        kind: ``"cosine"`` or ``"cosine2"``.
        num_steps: ``T``, the number of diffusion steps (HiDiff: 10).
        s: the cosine offset (0.008).
        max_beta: upper clip of every ``beta_k`` (0.999).

    Attributes (float64 tensors of length ``T``): ``betas``, ``alphas = 1 - betas``,
    ``alpha_bars`` (cumulative product), ``alpha_bars_prev`` (``alpha_bars`` shifted right
    with ``alpha_bars_prev[0] = 1``).
    """

    KINDS = ("cosine", "cosine2")

    def __init__(self, kind: str, num_steps: int = 10, s: float = 0.008, max_beta: float = 0.999) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
        if not s > 0.0:
            raise ValueError(f"s must be positive, got {s}")
        if not 0.0 < max_beta <= 1.0:
            raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
        self.kind = kind
        self.num_steps = int(num_steps)
        self.s = float(s)
        self.max_beta = float(max_beta)
        power = 2 if kind == "cosine2" else 1

        def f(u: float) -> float:
            return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** power

        t = self.num_steps
        betas = [min(1.0 - f((k + 1) / t) / f(k / t), max_beta) for k in range(t)]
        self.betas = torch.tensor(betas, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])

    def __repr__(self) -> str:
        return (
            f"BernoulliSchedule(kind={self.kind!r}, num_steps={self.num_steps}, s={self.s}, max_beta={self.max_beta})"
        )

    def abar(self, k: int) -> float:
        """``alpha_bar[k]`` as a Python float; ``k = -1`` gives 1 (the clean state)."""
        if k == -1:
            return 1.0
        self._check_index(k)
        return float(self.alpha_bars[k])

    def _check_index(self, k: int) -> None:
        if not 0 <= k < self.num_steps:
            raise ValueError(f"step index must be in [0, {self.num_steps}), got {k}")


@dataclass
class EnsembleResult:
    """Output of :meth:`BBDM.sample_ensemble`.

    Attributes:
        prob: mean over the members of the final ``y0_hat``, ``[B, K, ...]`` in ``[0, 1]``.
        uncertainty: per-element standard deviation of ``y0_hat`` over the members,
            ``[B, K, ...]`` in ``[0, 0.5]``; all zeros for a single member.
        members: the members' ``y0_hat`` stacked as ``[E, B, K, ...]`` when asked for, else None.
    """

    prob: torch.Tensor
    uncertainty: torch.Tensor
    members: Optional[torch.Tensor] = None


class BBDM:
    """HiDiff's binary Bernoulli diffusion with a segmentor prior ``p`` (spec §1).

    Forward process: ``q(y_k | y_{k-1}) = B(alpha_k·y_{k-1} + (1-alpha_k)·p)``, closed form
    ``q(y_k | y0) = B(alpha_bar_k·y0 + (1-alpha_bar_k)·p)``; the chain ends at the prior.
    The refiner predicts the flip probability ``eps_hat`` of ``y_k`` relative to ``y0``, and
    ``y0_hat = |y_k - eps_hat|``.

    Args:
        schedule: the :class:`BernoulliSchedule` (``T`` steps).
    """

    def __init__(self, schedule: BernoulliSchedule) -> None:
        if not isinstance(schedule, BernoulliSchedule):
            raise ValueError(f"schedule must be a BernoulliSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.schedule.num_steps

    # ------------------------------------------------------------------ helpers
    def _coef(self, table: torch.Tensor, k: Step, like: torch.Tensor) -> torch.Tensor:
        """``table[k]`` as a tensor broadcastable against ``like`` (dtype/device of ``like``)."""
        if isinstance(k, torch.Tensor):
            if k.dim() == 0:
                k = k.reshape(1).expand(like.shape[0])
            if k.dim() != 1 or k.shape[0] != like.shape[0]:
                raise ValueError(f"step tensor must be [B] with B={like.shape[0]}, got {tuple(k.shape)}")
            if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.num_steps):
                raise ValueError(f"step indices must be in [0, {self.num_steps})")
            vals = table[k.detach().long().cpu()].to(dtype=like.dtype, device=like.device)
            return vals.view(-1, *([1] * (like.dim() - 1)))
        self.schedule._check_index(int(k))
        return torch.tensor(float(table[int(k)]), dtype=like.dtype, device=like.device)

    @staticmethod
    def _bernoulli(prob: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return torch.bernoulli(prob.clamp(0.0, 1.0), generator=generator)

    @staticmethod
    def _check_same_shape(**tensors: torch.Tensor) -> None:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"tensors must have the same shape, got {shapes}")

    # ---------------------------------------------------------- forward process
    def q_prob(self, y0: torch.Tensor, p: torch.Tensor, k: Step) -> torch.Tensor:
        """``P(y_k = 1 | y0, p) = alpha_bar_k·y0 + (1-alpha_bar_k)·p``; same shape as ``y0``, in [0, 1].

        ``y0`` may be soft (a probability); the result is then the mixture's marginal.
        """
        self._check_same_shape(y0=y0, p=p)
        ab = self._coef(self.schedule.alpha_bars, k, y0)
        return ab * y0 + (1.0 - ab) * p

    def q_sample(
        self, y0: torch.Tensor, p: torch.Tensor, k: Step, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """A draw of ``y_k ~ q(y_k | y0, p)``: float tensor of ``y0``'s shape in ``{0, 1}``."""
        return self._bernoulli(self.q_prob(y0, p, k), generator)

    def flip_prob(self, y0: torch.Tensor, p: torch.Tensor, k: Step) -> torch.Tensor:
        """``P(y_k != y0) = (1-alpha_bar_k)·|p - y0|`` for binary ``y0``; in ``[0, 1]``."""
        self._check_same_shape(y0=y0, p=p)
        ab = self._coef(self.schedule.alpha_bars, k, y0)
        return (1.0 - ab) * (p - y0).abs()

    def step_prob(self, y_prev: torch.Tensor, p: torch.Tensor, k: Step) -> torch.Tensor:
        """One-step kernel ``P(y_k = 1 | y_{k-1}, p) = alpha_k·y_{k-1} + (1-alpha_k)·p``; in [0, 1]."""
        self._check_same_shape(y_prev=y_prev, p=p)
        a = self._coef(self.schedule.alphas, k, y_prev)
        return a * y_prev + (1.0 - a) * p

    def step_sample(
        self, y_prev: torch.Tensor, p: torch.Tensor, k: Step, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """A draw of ``y_k`` from the one-step kernel; ``{0, 1}``-valued."""
        return self._bernoulli(self.step_prob(y_prev, p, k), generator)

    # ---------------------------------------------------------------- posterior
    def posterior(self, y0: torch.Tensor, yk: torch.Tensor, p: torch.Tensor, k: Step) -> torch.Tensor:
        """``P(y_{k-1} = 1 | y_k, y0, p)`` by Bayes' rule with the one-step kernel; in [0, 1].

        ``yk`` must be binary; ``y0`` may be soft (then ``y0`` is read as ``P(y0 = 1)``). At
        ``k = 0`` the previous state is ``y0`` itself (``alpha_bar_{-1} = 1``), so for a binary
        ``y0`` the posterior is ``y0``. Impossible configurations (zero evidence) return 0.
        """
        self._check_same_shape(y0=y0, yk=yk, p=p)
        a = self._coef(self.schedule.alphas, k, yk)
        ab_prev = self._coef(self.schedule.alpha_bars_prev, k, yk)
        lik_prior = yk * p + (1.0 - yk) * (1.0 - p)  # P(fresh draw from the prior equals y_k)
        a1 = (a * yk + (1.0 - a) * lik_prior) * (ab_prev * y0 + (1.0 - ab_prev) * p)
        a0 = (a * (1.0 - yk) + (1.0 - a) * lik_prior) * (ab_prev * (1.0 - y0) + (1.0 - ab_prev) * (1.0 - p))
        den = a0 + a1
        return a1 / den.clamp_min(torch.finfo(den.dtype).tiny)

    # -------------------------------------------------------------- calibration
    @staticmethod
    def calibrate(yk: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """``y0_hat = |y_k - eps_hat|`` (the soft XOR); ``eps_hat`` and the result in [0, 1]."""
        return (yk - eps_hat).abs()

    @staticmethod
    def calibrate_logits(yk: torch.Tensor, eps_logits: torch.Tensor) -> torch.Tensor:
        """``y0_hat = |y_k - sigmoid(eps_logits)|`` for binary ``y_k``, computed without cancellation.

        Equals ``sigmoid(eps_logits·(1 - 2·y_k))``; in [0, 1], same shape as ``yk``.
        """
        return torch.sigmoid(eps_logits * (1.0 - 2.0 * yk))

    def model_mean(self, y0_hat: torch.Tensor, yk: torch.Tensor, p: torch.Tensor, k: Step) -> torch.Tensor:
        """The model's ``P(y_{k-1} = 1)``: posterior with ``y0 := y0_hat`` for ``k >= 1``; ``y0_hat`` at ``k = 0``."""
        post = self.posterior(y0_hat, yk, p, k)
        if isinstance(k, torch.Tensor):
            k0 = (k.reshape(-1) == 0).view(-1, *([1] * (yk.dim() - 1)))
            return torch.where(k0, y0_hat, post)
        return y0_hat if int(k) == 0 else post

    # ------------------------------------------------------------------- steps
    def ddim_step(
        self,
        yk: torch.Tensor,
        y0_hat: torch.Tensor,
        k: int,
        k_next: int,
        generator: Optional[torch.Generator] = None,
        keep: Optional[torch.Tensor] = None,
        reset_to: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Stochastic DDIM-style update from step ``k`` to ``k_next < k`` (spec §1.7).

        ``π = ρ·y_k + (1-ρ)·y0_hat`` with ``ρ = (1-alpha_bar_{k_next})/(1-alpha_bar_k)``, then
        ``y_{k_next} ~ B(π)`` (``{0, 1}``-valued). ``k_next = -1`` ends the chain and returns the
        continuous ``y0_hat`` (in [0, 1]). Where the bool ``keep`` is True the result is replaced by
        ``reset_to`` (both broadcastable to ``yk``), e.g. clinician-edited voxels reset to the mask.
        """
        self._check_same_shape(yk=yk, y0_hat=y0_hat)
        self.schedule._check_index(int(k))
        if not -1 <= int(k_next) < int(k):
            raise ValueError(f"k_next must satisfy -1 <= k_next < k={k}, got {k_next}")
        if int(k_next) == -1:
            out = y0_hat
        else:
            rho = (1.0 - self.schedule.abar(int(k_next))) / (1.0 - self.schedule.abar(int(k)))
            out = self._bernoulli(rho * yk + (1.0 - rho) * y0_hat, generator)
        return self._apply_keep(out, keep, reset_to)

    def ancestral_step(
        self,
        yk: torch.Tensor,
        y0_hat: torch.Tensor,
        p: torch.Tensor,
        k: int,
        generator: Optional[torch.Generator] = None,
        keep: Optional[torch.Tensor] = None,
        reset_to: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Ancestral update ``y_{k-1} ~ B(posterior(y0_hat, y_k, p, k))``; at ``k = 0`` returns ``y0_hat``.

        ``keep``/``reset_to`` as in :meth:`ddim_step`.
        """
        if int(k) == 0:
            out = y0_hat
        else:
            out = self._bernoulli(self.posterior(y0_hat, yk, p, int(k)), generator)
        return self._apply_keep(out, keep, reset_to)

    @staticmethod
    def _apply_keep(out: torch.Tensor, keep: Optional[torch.Tensor], reset_to: Optional[torch.Tensor]) -> torch.Tensor:
        if keep is None:
            return out
        if reset_to is None:
            raise ValueError("reset_to is required when keep is given")
        return torch.where(keep.bool(), reset_to.to(out.dtype), out)

    # ------------------------------------------------------------------ chains
    def chain_indices(self, steps: int, start: Optional[int] = None) -> list[int]:
        """Descending step indices for a chain of ``steps`` refiner calls, from ``start`` to 0.

        ``start`` defaults to ``steps - 1`` (consecutive indices, the refine-from-a-mask case);
        with ``start = T - 1`` and ``steps < T`` the indices are evenly spaced (rounded) and
        always include ``start`` and 0.
        """
        if start is None:
            start = steps - 1
        self.schedule._check_index(int(start))
        if not 1 <= steps <= start + 1:
            raise ValueError(f"steps must be in [1, start+1={start + 1}], got {steps}")
        if steps == 1:
            return [int(start)]
        idx = [round(start - i * start / (steps - 1)) for i in range(steps)]
        return [int(i) for i in idx]

    def start_state(
        self,
        prior: torch.Tensor,
        k: int,
        mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """First state of a chain at step ``k``: ``{0, 1}``-valued, shape of ``prior``.

        With ``mask`` (a binary or soft ``y0``): the exact forward marginal
        ``B(alpha_bar_k·mask + (1-alpha_bar_k)·prior)``. Without: ``B(prior)``, the paper's start
        (the marginal's limit at ``k = T-1``).
        """
        self.schedule._check_index(int(k))
        if mask is None:
            return self._bernoulli(prior, generator)
        return self.q_sample(mask.to(prior.dtype), prior, int(k), generator)

    def sample(
        self,
        model_fn: ModelFn,
        prior: torch.Tensor,
        indices: Sequence[int],
        y_start: torch.Tensor,
        *,
        sampler: str = "ddim",
        keep: Optional[torch.Tensor] = None,
        reset_to: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[int, int], None]] = None,
    ) -> torch.Tensor:
        """Run one chain over ``indices`` (descending, ending at 0) from ``y_start``; returns ``y0_hat``.

        ``model_fn(y_k, k[B]) -> eps logits`` is called once per index, under the caller's grad
        mode. The result is the continuous ``y0_hat`` of the last call, ``[B, K, ...]`` in [0, 1],
        with ``keep`` voxels reset to ``reset_to``. ``sampler`` is ``"ddim"`` (the spaced,
        stochastic DDIM-style update) or ``"ancestral"`` (requires consecutive indices).
        ``callback(done, total)`` runs after every call; raising from it aborts the chain.
        """
        if sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {sampler!r}")
        idx = [int(i) for i in indices]
        if not idx or idx[-1] != 0 or any(a <= b for a, b in zip(idx, idx[1:])):
            raise ValueError(f"indices must be strictly descending and end at 0, got {idx}")
        if sampler == "ancestral" and any(a - b != 1 for a, b in zip(idx, idx[1:])):
            raise ValueError("the ancestral sampler needs consecutive indices")
        self._check_same_shape(prior=prior, y_start=y_start)
        y = self._apply_keep(y_start.to(prior.dtype), keep, reset_to)
        batch = y.shape[0]
        for n, k in enumerate(idx):
            kt = torch.full((batch,), k, dtype=torch.long, device=y.device)
            y0_hat = self.calibrate_logits(y, model_fn(y, kt).to(y.dtype))
            k_next = idx[n + 1] if n + 1 < len(idx) else -1
            if sampler == "ddim":
                y = self.ddim_step(y, y0_hat, k, k_next, generator, keep, reset_to)
            else:
                y = self.ancestral_step(y, y0_hat, prior, k, generator, keep, reset_to)
            if callback is not None:
                callback(n + 1, len(idx))
        return y

    def sample_ensemble(
        self,
        model_fn: ModelFn,
        prior: torch.Tensor,
        indices: Sequence[int],
        *,
        mask: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None,
        ensemble: int = 1,
        sampler: str = "ddim",
        generator: Optional[torch.Generator] = None,
        return_members: bool = False,
        callback: Optional[Callable[[int, int], None]] = None,
    ) -> EnsembleResult:
        """``ensemble`` independent chains (run one after another), averaged.

        Each member starts from :meth:`start_state` at ``indices[0]`` (forward marginal of
        ``mask`` when given, else ``B(prior)``) and follows :meth:`sample`; ``keep`` voxels are
        reset to ``mask`` after every step (``keep`` needs ``mask``). The members share the
        generator's stream, so a seeded generator gives the same result every time.
        ``callback(done, total)`` counts refiner calls over all members.
        """
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if keep is not None and mask is None:
            raise ValueError("keep needs mask (the values kept voxels are reset to)")
        reset_to = None if mask is None else mask.to(prior.dtype)
        total = ensemble * len(indices)
        members = []
        for e in range(ensemble):
            member_cb = None
            if callback is not None:

                def member_cb(done: int, _n: int, _e: int = e) -> None:
                    callback(_e * len(indices) + done, total)

            y_start = self.start_state(prior, int(indices[0]), mask, generator)
            members.append(
                self.sample(
                    model_fn,
                    prior,
                    indices,
                    y_start,
                    sampler=sampler,
                    keep=keep,
                    reset_to=reset_to,
                    generator=generator,
                    callback=member_cb,
                )
            )
        stack = torch.stack(members, dim=0)
        prob = stack.mean(dim=0)
        unc = stack.std(dim=0, unbiased=False) if ensemble > 1 else torch.zeros_like(prob)
        return EnsembleResult(prob=prob, uncertainty=unc, members=stack if return_members else None)

    # -------------------------------------------------------------------- loss
    def training_losses(
        self,
        model_fn: ModelFn,
        y0: torch.Tensor,
        p: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        *,
        focal_weight: float = 1.0,
        gamma: float = 2.0,
        generator: Optional[torch.Generator] = None,
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        """HiDiff's "mix" loss with one refiner call (spec §1.5).

        ``y0`` is a binary mask ``[B, K, ...]``, ``p`` the (detached or not) prior of the same
        shape, ``k`` a long tensor ``[B]`` (drawn uniformly from ``{0..T-1}`` when None). Draws
        ``y_k ~ q(y_k | y0, p)``, calls ``model_fn(y_k, k)`` once, and returns, in **bits** per
        element:

        - ``vb``: ``KL(B(posterior(y0)) || B(posterior(y0_hat)))`` for ``k >= 1``,
          ``-log B(y0; y0_hat)`` for ``k = 0``;
        - ``focal``: focal loss (``gamma``, no alpha) of ``eps_hat`` against ``y_k XOR y0``;
        - ``total = vb + focal_weight·focal``.

        ``reduction="mean"`` gives scalars (mean over the batch), ``"none"`` tensors ``[B]``.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self._check_same_shape(y0=y0, p=p)
        batch = y0.shape[0]
        if k is None:
            dev = generator.device if generator is not None else torch.device("cpu")
            k = torch.randint(0, self.num_steps, (batch,), generator=generator, device=dev).to(y0.device)
        k = k.long()
        yk = self.q_sample(y0, p, k, generator)
        logits = model_fn(yk, k).to(y0.dtype)
        if logits.shape != y0.shape:
            raise ValueError(f"model_fn returned {tuple(logits.shape)}, expected {tuple(y0.shape)}")
        dims = list(range(1, y0.dim()))
        y0_hat_logits = logits * (1.0 - 2.0 * yk)  # logit of y0_hat = |y_k - eps_hat|
        y0_hat = torch.sigmoid(y0_hat_logits)

        nll = F.binary_cross_entropy_with_logits(y0_hat_logits, y0, reduction="none").mean(dims)
        true_post = self.posterior(y0, yk, p, k)
        model_post = self.posterior(y0_hat, yk, p, k)
        kl = bernoulli_kl(true_post, model_post).mean(dims)
        vb = torch.where(k == 0, nll, kl) / _LN2

        eps_true = (yk - y0).abs()
        bce = F.binary_cross_entropy_with_logits(logits, eps_true, reduction="none")
        focal = ((1.0 - torch.exp(-bce)) ** gamma * bce).mean(dims) / _LN2
        total = vb + focal_weight * focal
        out = {"vb": vb, "focal": focal, "total": total}
        if reduction == "mean":
            out = {name: value.mean() for name, value in out.items()}
        return out
