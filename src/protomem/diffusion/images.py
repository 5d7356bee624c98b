"""A small Gaussian DDPM for images: a compact U-Net, epsilon prediction, ancestral sampling (torch).

Ho et al. 2020 ("Denoising diffusion probabilistic models") with the cosine noise schedule of Nichol &
Dhariwal 2021. Built for tiny images (8x8 digits up to 32x32) on a CPU: the U-Net has two resolutions
below the input, one residual block per level, time embedding added in every block.

Images are (N, C, H, W) float tensors scaled to [-1, 1]; H and W must be divisible by 4. Everything runs
on the device of the model (move the schedule there with ``schedule.to(device)``); samples come back on
the CPU.

    model = ImageUNet(channels=1, width=32)
    schedule = NoiseSchedule(timesteps=200)
    loss = diffusion_loss(model, schedule, batch, generator)
    images = sample_images(model, schedule, count=64, shape=(1, 8, 8), seed=0)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from protomem.diffusion.device import module_device


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) integer steps -> (B, dim) sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the time embedding, twice, with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ImageUNet(nn.Module):
    """Predicts the noise in (B, C, H, W) images at steps t: levels H, H/2, H/4 with widths w, 2w, 2w."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        time_dim = 4 * width
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = ResBlock(width, width, time_dim)
        self.pool1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * width, 2 * width, time_dim)
        self.pool2 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.middle = ResBlock(2 * width, 2 * width, time_dim)
        self.up2 = ResBlock(4 * width, 2 * width, time_dim)
        self.up1 = ResBlock(3 * width, width, time_dim)
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.width))
        h1 = self.down1(self.stem(x), emb)  # (B, w, H, W)
        h2 = self.down2(self.pool1(h1), emb)  # (B, 2w, H/2, W/2)
        h = self.middle(self.pool2(h2), emb)  # (B, 2w, H/4, W/4)
        h = F.interpolate(h, size=h2.shape[-2:], mode="nearest")
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = F.interpolate(h, size=h1.shape[-2:], mode="nearest")
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.head(h)


class NoiseSchedule:
    """Cosine schedule: alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas clipped at 0.999."""

    def __init__(self, timesteps: int = 200, offset: float = 0.008) -> None:
        self.timesteps = timesteps
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alpha_bar = torch.cumprod(1 - betas, dim=0).float()  # (T,) for t = 0..T-1

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the tables to ``device`` (in place); returns self."""
        self.betas, self.alphas = self.betas.to(device), self.alphas.to(device)
        self.alpha_bar = self.alpha_bar.to(device)
        return self

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        a = self.alpha_bar[t][:, None, None, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(
    model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared error of the predicted noise at uniformly drawn steps (Ho et al. 2020, L_simple)."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return F.mse_loss(model(schedule.add_noise(x0, t, noise), t), noise)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    schedule: NoiseSchedule,
    count: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    batch_size: int = 512,
) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps: (count, C, H, W) in [-1, 1] (clipped), on the CPU.

    Runs on the model's device (the schedule must be there too). Uses the posterior variance beta_tilde
    and clips the predicted x0 to [-1, 1] at every step.
    """
    was_training = model.training
    model.eval()
    device = module_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        x = torch.randn((n, *shape), generator=generator, device=device)
        for step in reversed(range(schedule.timesteps)):
            t = torch.full((n,), step, dtype=torch.long, device=device)
            eps = model(x, t)
            a_bar = schedule.alpha_bar[step]
            a_bar_prev = schedule.alpha_bar[step - 1] if step > 0 else torch.tensor(1.0, device=device)
            x0 = ((x - (1 - a_bar).sqrt() * eps) / a_bar.sqrt()).clamp(-1, 1)
            beta = schedule.betas[step]
            mean = (a_bar_prev.sqrt() * beta / (1 - a_bar)) * x0 + (
                schedule.alphas[step].sqrt() * (1 - a_bar_prev) / (1 - a_bar)
            ) * x
            if step > 0:
                variance = beta * (1 - a_bar_prev) / (1 - a_bar)
                x = mean + variance.sqrt() * torch.randn(x.shape, generator=generator, device=device)
            else:
                x = mean
        out.append(x.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(out)


class EMA:
    """Exponential moving average of a model's parameters (the weights used for sampling)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)
