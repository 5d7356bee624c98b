"""Noise processes: forward corruption, training loss and ancestral sampler behind one interface.

A process owns everything that depends on how tokens are corrupted; the trainer only calls
``process.loss(model, x0, classes, generator)`` and ``process.sample(model, count, steps, classes,
generator)``. Adding a process = one subclass of :class:`NoiseProcess` + one entry in ``PROCESSES``
(+ its name in ``DiffusionConfig.process``); the trainer does not change.

Conventions: tokens are int64 in [0, V); the model receives time as a fraction t in [0, 1] of the way to
pure noise and returns logits (B, N, V) of the clean tokens (x0-parameterization). Every tensor a process
creates lives on the device of its input (``x0`` in ``loss``, the generator in ``sample``), and the
generator must live there too.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from protomem.diffusion.config import DiffusionConfig

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class NoiseProcess(ABC):
    """One discrete corruption process. Subclasses set ``n_input_tokens`` (what the model must embed)."""

    name: str = ""
    n_input_tokens: int

    def __init__(self, config: DiffusionConfig) -> None:
        self.vocab_size = config.vocab_size
        self.config = config

    @abstractmethod
    def loss(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Scalar training loss for clean tokens x0 (B, N) int64; randomness only from ``generator``."""

    @abstractmethod
    def sample(
        self,
        model: Denoiser,
        count: int,
        seq_len: int,
        steps: int,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Ancestral sampling with ``steps`` denoising steps -> (count, seq_len) int64 in [0, V), on the
        generator's device."""

    @abstractmethod
    def nll_bound(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
        draws: int,
    ) -> torch.Tensor:
        """(B,) float64 on the CPU: each sequence's negative ELBO in nats (the bound the loss trains, whole
        sequence), an unbiased estimate from ``draws`` stratified noise draws per sequence; the noise is
        drawn on ``x0``'s device, where ``generator`` must live.

        The noise comes from ``generator`` only and does not depend on the model: the same generator state
        and sequences give the same noise at every checkpoint, so bounds of different checkpoints differ
        only through the model (common random numbers).
        """


def wide_float(device: torch.device) -> torch.dtype:
    """float64 where the device has it (not MPS, which gets float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _stratified_uniform(rows: int, draws: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, draws) float64 (float32 on MPS) in [0, 1) on the generator's device: draw j of a row lies in
    the stratum [j / draws, (j + 1) / draws)."""
    device = generator.device
    dtype = wide_float(device)
    offsets = torch.rand((rows, draws), generator=generator, dtype=dtype, device=device)
    return (torch.arange(draws, dtype=dtype, device=device) + offsets) / draws


def _categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (..., V) -> (...) int64, via inverse CDF (deterministic given generator)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class UniformProcess(NoiseProcess):
    """D3PM-uniform: q(x_t | x_0) keeps x_0 with probability abar_t, else a uniform token.

    Discrete steps t = 1..T. Schedules of the keep probability abar_t (abar_0 = 1, abar_T = 0):
    ``linear``: abar_t = 1 - t/T, i.e. beta_t = 1 / (T - t + 1) (Sohl-Dickstein et al.; the D3PM
    "mutual-information" schedule for this process); ``cosine``: abar_t = cos(pi/2 (t/T + 0.008)/1.008)^2,
    normalised so abar_0 = 1 (Nichol & Dhariwal; D3PM's choice for uniform noise).

    Loss: the variational bound's term for one uniformly drawn t per sequence, KL(q(x_{t-1} | x_t, x_0)
    || p(x_{t-1} | x_t)) (for t = 1: -log p(x_0 | x_1)), averaged over tokens, with
    p(x_{t-1} | x_t) proportional to q(x_t | x_{t-1}) * sum_x0 q(x_{t-1} | x0) p~(x0 | x_t) (D3PM's
    x0-parameterization), plus ``ce_weight`` times the cross-entropy of p~(x0 | x_t).
    The full bound in nats per token is T times the KL part (plus the prior term, ~0 here).
    """

    name = "uniform"

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.n_input_tokens = config.vocab_size
        self.timesteps = config.timesteps
        self.ce_weight = config.ce_weight
        self.alpha_bar = uniform_alpha_bar(config.schedule, config.timesteps)  # (T+1,) float64, CPU
        self._keep_tables: dict[torch.device, torch.Tensor] = {}

    def keep_probability(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t as float32 for integer steps t (any shape), on t's device (table copied there once)."""
        table = self._keep_tables.get(t.device)
        if table is None:
            table = self._keep_tables[t.device] = self.alpha_bar.float().to(t.device)
        return table[t]

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) for integer steps t (B,) -> (B, N) int64."""
        keep = torch.rand(x0.shape, generator=generator, device=x0.device) < self.keep_probability(t)[:, None]
        noise = torch.randint(0, self.vocab_size, x0.shape, generator=generator, device=x0.device)
        return torch.where(keep, x0, noise)

    def _log_posterior(
        self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, log_x0: torch.Tensor
    ) -> torch.Tensor:
        """log q(x_s | x_t, x0 ~ exp(log_x0)), s < t, normalised over the last axis.

        x_t (B, N); t, s (B,) int; log_x0 (B, N, V) log-probabilities of x0 (one-hot or predicted).
        """
        v = self.vocab_size
        abar_t = self.keep_probability(t)[:, None, None]
        abar_s = self.keep_probability(s)[:, None, None]
        keep = abar_t / abar_s  # probability that the step s -> t keeps the token
        # q(x_t | x_s) as a function of x_s: keep * [x_s == x_t] + (1 - keep) / V
        log_f = torch.log(keep * F.one_hot(x_t, v) + (1 - keep) / v)
        # q(x_s | x0) mixed over x0: abar_s * p(x0) + (1 - abar_s) / V, in log space
        log_g = torch.logaddexp(torch.log(abar_s) + log_x0, torch.log1p(-abar_s) - math.log(v))
        return torch.log_softmax(log_f + log_g, dim=-1)

    def loss(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        batch = x0.shape[0]
        t = torch.randint(1, self.timesteps + 1, (batch,), generator=generator, device=x0.device)
        x_t = self.corrupt(x0, t, generator)
        logits = model(x_t, t.float() / self.timesteps, classes)
        log_p0 = torch.log_softmax(logits.float(), dim=-1)
        log_x0_true = torch.log(F.one_hot(x0, self.vocab_size).float())  # 0 / -inf
        log_q = self._log_posterior(x_t, t, t - 1, log_x0_true)
        log_p = self._log_posterior(x_t, t, t - 1, log_p0)
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)  # (B, N)
        loss = kl.mean()
        if self.ce_weight > 0:
            loss = loss + self.ce_weight * F.nll_loss(log_p0.reshape(-1, self.vocab_size), x0.reshape(-1))
        return loss

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        count: int,
        seq_len: int,
        steps: int,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        device = generator.device
        times = strided_times(self.timesteps, steps)
        x = torch.randint(0, self.vocab_size, (count, seq_len), generator=generator, device=device)
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            t = torch.full((count,), t_now, dtype=torch.long, device=device)
            s = torch.full((count,), t_next, dtype=torch.long, device=device)
            log_p0 = torch.log_softmax(model(x, t.float() / self.timesteps, classes).float(), dim=-1)
            probs = self._log_posterior(x, t, s, log_p0).exp()
            x = _categorical(probs, generator)
        return x

    @torch.no_grad()
    def nll_bound(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
        draws: int,
    ) -> torch.Tensor:
        """Negative ELBO = sum over t = 1..T of the loss's KL term summed over tokens (the prior term is 0:
        abar_T = 0). Estimated as T times the mean over ``draws`` times t stratified over 1..T."""
        batch = x0.shape[0]
        u = _stratified_uniform(batch, draws, generator)
        t = (u * self.timesteps).long().clamp_(max=self.timesteps - 1) + 1  # (B, D) in 1..T
        x0_rep = x0.repeat_interleave(draws, dim=0)
        t = t.reshape(-1)
        x_t = self.corrupt(x0_rep, t, generator)
        rep_classes = None if classes is None else classes.repeat_interleave(draws, dim=0)
        log_p0 = torch.log_softmax(model(x_t, t.float() / self.timesteps, rep_classes).float(), dim=-1)
        log_q = self._log_posterior(x_t, t, t - 1, torch.log(F.one_hot(x0_rep, self.vocab_size).float()))
        log_p = self._log_posterior(x_t, t, t - 1, log_p0)
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum((-1, -2))  # (B * D,)
        return kl.cpu().double().reshape(batch, draws).mean(1) * self.timesteps


def uniform_alpha_bar(schedule: str, timesteps: int) -> torch.Tensor:
    """Keep probabilities abar_0..abar_T (T+1,) float64 with abar_0 = 1 and abar_T = 0."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    if schedule == "linear":
        alpha_bar = 1.0 - t
    elif schedule == "cosine":
        offset = 0.008
        f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    alpha_bar[-1] = 0.0
    return alpha_bar


def strided_times(timesteps: int, steps: int) -> list[int]:
    """Decreasing integer times T = t_0 > t_1 > ... > t_k = 0 with k = min(steps, T) roughly even steps."""
    raw = torch.linspace(timesteps, 0, min(steps, timesteps) + 1, dtype=torch.float64).round().long()
    return sorted(set(raw.tolist()), reverse=True)


class MaskedProcess(NoiseProcess):
    """Absorbing / masked diffusion in continuous time (MDLM, MD4).

    Token id V is the mask. At time t in (0, 1] each token is independently masked with probability
    1 - alpha(t): ``linear`` alpha(t) = 1 - t, ``cosine`` alpha(t) = 1 - cos(pi/2 (1 - t)).
    Loss: the continuous-time ELBO, E_t[ -alpha'(t) / (1 - alpha(t)) * sum over masked tokens of
    -log p~(x0_i | x_t) ] / N, nats per token (an upper bound of the NLL per token). Times in a batch are
    stratified (t_i = (u + i/B) mod 1) to reduce variance, as in MDLM.
    Sampler: from t to s < t each masked token is revealed with probability
    (alpha(s) - alpha(t)) / (1 - alpha(t)), its value drawn from p~(x0 | x_t); revealed tokens stay.
    """

    name = "masked"
    min_time = 1e-3

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        self.mask_id = config.vocab_size
        self.n_input_tokens = config.vocab_size + 1
        self.schedule = config.schedule

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            return 1.0 - t
        return 1.0 - torch.cos(math.pi / 2 * (1.0 - t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t))."""
        if self.schedule == "linear":
            return 1.0 / t
        return math.pi / 2 * torch.tan(math.pi / 2 * (1.0 - t))

    def loss(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        batch, n = x0.shape
        device = x0.device
        u = torch.rand((1,), generator=generator, device=device)
        t = torch.remainder(u + torch.arange(batch, dtype=torch.float32, device=device) / batch, 1.0)
        t = self.min_time + (1.0 - self.min_time) * t
        masked = torch.rand(x0.shape, generator=generator, device=device) < (1.0 - self.alpha(t))[:, None]
        x_t = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        logits = model(x_t, t, classes)
        nll = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, N)
        per_sequence = (nll * masked).sum(1) / n
        return (self.weight(t) * per_sequence).mean()

    @torch.no_grad()
    def sample(
        self,
        model: Denoiser,
        count: int,
        seq_len: int,
        steps: int,
        classes: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        device = generator.device
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # CPU scalars: the schedule
        x = torch.full((count, seq_len), self.mask_id, dtype=torch.long, device=device)
        for t_now, t_next in zip(times[:-1], times[1:], strict=True):
            is_masked = x == self.mask_id
            if not is_masked.any():
                break
            a_t, a_s = self.alpha(t_now), self.alpha(t_next)
            reveal_prob = float((a_s - a_t) / (1.0 - a_t)) if t_next > 0 else 1.0
            t = torch.full((count,), float(t_now), dtype=torch.float32, device=device)
            probs = torch.softmax(model(x, t, classes).float(), dim=-1)
            draw = _categorical(probs, generator)
            reveal = is_masked & (torch.rand(x.shape, generator=generator, device=device) < reveal_prob)
            x = torch.where(reveal, draw, x)
        return x

    def mask_fraction_to_time(self, fraction: torch.Tensor) -> torch.Tensor:
        """The time t at which a token is masked with probability ``fraction`` (inverse of 1 - alpha)."""
        if self.schedule == "linear":
            return fraction
        return 1.0 - 2.0 / math.pi * torch.arccos(fraction)

    @torch.no_grad()
    def nll_bound(
        self,
        model: Denoiser,
        x0: torch.Tensor,
        classes: torch.Tensor | None,
        generator: torch.Generator,
        draws: int,
    ) -> torch.Tensor:
        """Negative ELBO by the number of masked tokens k instead of the time t.

        The continuous-time bound equals sum over k = 1..N of E[(1/k) sum over the k masked tokens of
        -log p~(x0_i | x_t)], with the masked set uniform among the k-subsets and the mask fraction of t
        distributed Beta(k, N - k + 1) (for any schedule: the bound is schedule-invariant). Without the
        1/t weight of the training loss this has a far smaller variance. Each draw takes N uniforms r per
        token: the k smallest are masked and the k-th smallest is the mask fraction (the ranks of i.i.d.
        uniforms are independent of their order statistics, and the k-th is Beta(k, N - k + 1)); k is
        stratified over 1..N across the ``draws``. With exact conditionals the bound equals -log p(x0).
        """
        batch, n = x0.shape
        k = (_stratified_uniform(batch, draws, generator) * n).long().clamp_(max=n - 1) + 1  # (B, D)
        r = torch.rand((batch, draws, n), generator=generator, dtype=wide_float(x0.device), device=x0.device)
        kth = torch.sort(r, dim=-1).values.gather(-1, (k - 1)[..., None])  # (B, D, 1)
        masked = (r <= kth).reshape(batch * draws, n)
        t = self.mask_fraction_to_time(kth.reshape(-1)).clamp(min=self.min_time).float()
        x0_rep = x0.repeat_interleave(draws, dim=0)
        x_t = torch.where(masked, torch.full_like(x0_rep, self.mask_id), x0_rep)
        rep_classes = None if classes is None else classes.repeat_interleave(draws, dim=0)
        logits = model(x_t, t, rep_classes)
        nll = F.cross_entropy(logits.float().transpose(1, 2), x0_rep, reduction="none")  # (B * D, N)
        per_draw = (nll * masked).sum(1).cpu().double() / k.reshape(-1).cpu().double()
        return per_draw.reshape(batch, draws).mean(1) * n


PROCESSES: dict[str, type[NoiseProcess]] = {"uniform": UniformProcess, "masked": MaskedProcess}


def build_process(config: DiffusionConfig) -> NoiseProcess:
    return PROCESSES[config.process](config)
