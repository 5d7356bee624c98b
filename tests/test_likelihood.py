"""The per-sequence ELBO (``protomem.diffusion.nll_bound``) against exact enumerations on tiny grammars.

- Masked process with an *oracle* denoiser (the grammar's exact conditionals, by enumeration): the bound
  is then exactly -log p(x); the estimator's mean must converge to it.
- Masked process with a small trained tree U-Net (time-dependent): the exact bound, by enumerating every
  mask set and integrating the mask fraction by quadrature, must match the estimator's mean, and the
  training loss (the same bound, estimated with 1/t weights) must agree with it too.
- Uniform process: the exact bound, by enumerating every noisy sequence at every step, against the
  estimator's mean.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from protomem.diffusion import DiffusionConfig, build_model, build_process, nll_bound
from protomem.diffusion.checkpoint import LoadedCheckpoint
from protomem.diffusion.sampling import seeded_generator
from protomem.errors import ProtomemError
from protomem.grammar import enumerate_strings, sample_grammar

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    """v=3, n=2, m=2, s=2, L=2: 2 * 2^3 = 16 strings of 4 tokens, Zipf rules (unequal probabilities)."""
    grammar = sample_grammar(3, 2, 2, 2, 2, seed=3, zipf_exponent=1.0)
    return grammar, enumerate_strings(grammar)


def config_for(grammar, process: str, **fields) -> DiffusionConfig:
    base = dict(
        vocab_size=grammar.vocab_size,
        seq_len=grammar.length,
        branching=grammar.branching,
        process=process,
        width=16,
        steps=10,
        batch_size=16,
        threads=1,
        timesteps=6,
        precision="fp32",
    )
    base.update(fields)
    return DiffusionConfig(**base)


def loaded(model: nn.Module, config: DiffusionConfig) -> LoadedCheckpoint:
    return LoadedCheckpoint(model, build_process(config), config, 0, Path("."), False)


class OracleDenoiser(nn.Module):
    """Logits of the exact p(x_i | unmasked tokens) under the grammar, for every position (masked process)."""

    def __init__(self, tokens: np.ndarray, logprob: np.ndarray, vocab_size: int) -> None:
        super().__init__()
        self.tokens = torch.as_tensor(tokens)
        self.weights = torch.as_tensor(np.exp(logprob))
        self.vocab_size = vocab_size

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        visible = x_t < self.vocab_size  # (B, N)
        agrees = (self.tokens[None] == x_t[:, None]) | ~visible[:, None]  # (B, S, N)
        weight = self.weights[None] * agrees.all(-1)  # (B, S): strings consistent with what is visible
        onehot = nn.functional.one_hot(self.tokens, self.vocab_size).double()  # (S, N, V)
        marginal = torch.einsum("bs,snv->bnv", weight, onehot)
        return torch.log(marginal.clamp_min(1e-300)).float()


def exact_masked_bound(model: nn.Module, process, x0: torch.Tensor, nodes: int = 48) -> float:
    """The masked bound by enumeration: sum over k of (1/k) E_{u ~ Beta(k, N-k+1)} of the mean over
    k-subsets S of sum_{i in S} -log p(x0_i | x0 masked on S, t(u)), with u by Gauss-Legendre quadrature."""
    n = x0.shape[0]
    grid, gauss_weights = np.polynomial.legendre.leggauss(nodes)
    u = (grid + 1) / 2
    total = 0.0
    for k in range(1, n + 1):
        density = (
            u ** (k - 1)
            * (1 - u) ** (n - k)
            / math.exp(math.lgamma(k) + math.lgamma(n - k + 1) - math.lgamma(n + 1))
        )
        subsets = list(itertools.combinations(range(n), k))
        for ui, wi in zip(u, gauss_weights * density / 2, strict=True):
            t = process.mask_fraction_to_time(torch.tensor(ui, dtype=torch.float64)).clamp(
                min=process.min_time
            )
            x_t = x0.repeat(len(subsets), 1)
            for row, subset in enumerate(subsets):
                x_t[row, list(subset)] = process.mask_id
            with torch.no_grad():
                logits = model(x_t, torch.full((len(subsets),), float(t)), None)
            nll = nn.functional.cross_entropy(
                logits.float().transpose(1, 2), x0.repeat(len(subsets), 1), reduction="none"
            )
            masked = x_t == process.mask_id
            total += wi * float((nll * masked).sum()) / k / len(subsets)
    return total


def test_masked_bound_with_exact_conditionals_is_minus_log_likelihood(tiny):
    grammar, every = tiny
    config = config_for(grammar, "masked")
    oracle = OracleDenoiser(every.tokens, every.logprob, grammar.vocab_size)
    estimates = np.stack(
        [nll_bound(loaded(oracle, config), every.tokens, draws=4, seed=s) for s in range(400)]
    )
    mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert np.all(np.abs(mean - -every.logprob) < 4 * error), np.c_[mean, -every.logprob, error]
    # the enumeration itself is exact: sum over k of the mean conditional NLL is -log p(x)
    exact = [
        exact_masked_bound(oracle, build_process(config), torch.as_tensor(x), nodes=4)
        for x in every.tokens[:4]
    ]
    assert np.allclose(exact, -every.logprob[:4], atol=1e-6)


@pytest.fixture(scope="module")
def trained_masked(tiny):
    """A tree U-Net after a few hundred steps on the grammar's strings (so it depends on t and the tokens)."""
    grammar, every = tiny
    config = config_for(grammar, "masked", steps=200)
    torch.manual_seed(0)
    process = build_process(config)
    model = build_model(config, process.n_input_tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.as_tensor(every.tokens)
    generator = seeded_generator(1)
    for _ in range(200):
        rows = torch.randint(0, len(data), (32,), generator=generator)
        loss = process.loss(model, data[rows], None, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return config, process, model


def test_masked_bound_estimator_matches_exact_enumeration(tiny, trained_masked):
    grammar, every = tiny
    config, process, model = trained_masked
    x = every.tokens[:3]
    exact = np.array([exact_masked_bound(model, process, torch.as_tensor(row)) for row in x])
    estimates = np.stack([nll_bound(loaded(model, config), x, draws=4, seed=s) for s in range(200)])
    mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert np.all(np.abs(mean - exact) < 4 * error + 1e-3), (mean, exact, error)
    # the training loss estimates the same bound (per token, with 1/t weights): N x its mean agrees
    generator = seeded_generator(5)
    with torch.no_grad():
        losses = [
            float(process.loss(model, torch.as_tensor(x[:1]).repeat(64, 1), None, generator))
            for _ in range(300)
        ]
    loss_mean, loss_error = np.mean(losses) * x.shape[1], np.std(losses) * x.shape[1] / math.sqrt(len(losses))
    assert abs(loss_mean - exact[0]) < 4 * loss_error + 1e-3, (loss_mean, exact[0], loss_error)


def test_uniform_bound_estimator_matches_exact_enumeration(tiny):
    grammar, every = tiny
    config = config_for(grammar, "uniform", timesteps=5)
    process = build_process(config)
    torch.manual_seed(2)
    model = build_model(config, process.n_input_tokens).eval()
    x0 = torch.as_tensor(every.tokens[:2])
    n, v, horizon = x0.shape[1], grammar.vocab_size, config.timesteps
    states = torch.tensor(list(itertools.product(range(v), repeat=n)))  # every noisy sequence
    exact = []
    for row in x0:
        total = 0.0
        for t in range(1, horizon + 1):
            abar = float(process.alpha_bar[t])
            same = (states == row).double()
            q_t = (abar * same + (1 - abar) / v).prod(-1)  # q(x_t | x0) of every state
            tt = torch.full((len(states),), t)
            log_p0 = torch.log_softmax(model(states, tt.float() / horizon, None).float(), -1)
            onehot = torch.log(nn.functional.one_hot(row.repeat(len(states), 1), v).float())
            log_q = process._log_posterior(states, tt, tt - 1, onehot)
            log_p = process._log_posterior(states, tt, tt - 1, log_p0)
            q = log_q.exp()
            kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum((-1, -2))
            total += float((q_t * kl.double()).sum())
        exact.append(total)
    estimates = np.stack([nll_bound(loaded(model, config), x0.numpy(), draws=5, seed=s) for s in range(300)])
    mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert np.all(np.abs(mean - np.array(exact)) < 4 * error + 1e-3), (mean, exact, error)


def test_bound_noise_is_fixed_by_the_seed(tiny, trained_masked):
    grammar, every = tiny
    config, _, model = trained_masked
    one = nll_bound(loaded(model, config), every.tokens, seed=7)
    assert np.array_equal(one, nll_bound(loaded(model, config), every.tokens, seed=7))
    assert not np.array_equal(one, nll_bound(loaded(model, config), every.tokens, seed=8))
    with pytest.raises(ProtomemError, match="shape"):
        nll_bound(loaded(model, config), every.tokens[:, :2])
    with pytest.raises(ProtomemError, match="draws"):
        nll_bound(loaded(model, config), every.tokens, draws=0)
