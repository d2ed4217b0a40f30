"""DDPM (Ho et al. 2020): noise schedules, the forward process, the simple loss and sampling.

Time indices are 0-based: index ``k`` in ``0..T-1`` is the paper's step ``t = k + 1``, so
``alpha_bar[k] = prod_{j <= k} (1 - beta_j)`` and ``alpha_bar[T-1]`` is ᾱ_T.

Everything is computed in float64 once and cast to the data's dtype and device when used, so a
float32 model never sees a rounded-away ``1 - alpha_bar`` near t = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_modules.errors import UserError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ancestral", "ddim")


def make_betas(
    schedule: str = "linear",
    timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
) -> Tensor:
    """β_1..β_T as a float64 tensor of length ``timesteps``.

    ``linear``: Ho et al., ``beta_start`` → ``beta_end`` (1e-4 → 0.02 at T = 1000 gives
    ᾱ_T ≈ 4e-5). ``cosine``: Nichol & Dhariwal 2021, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
    normalised to ᾱ(0) = 1, β clipped at 0.999 (``beta_start``/``beta_end`` unused).
    """
    if timesteps < 1:
        raise UserError(f"ddpm.timesteps={timesteps}: need at least 1 step")
    if schedule == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise UserError(
                f"ddpm.beta_start={beta_start}, ddpm.beta_end={beta_end}: need 0 < start <= end < 1"
            )
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise UserError(f"ddpm.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")


def respaced_indices(timesteps: int, steps: int | None) -> list[int]:
    """``steps`` time indices spread evenly over ``0..T-1`` (all T when ``steps`` is None)."""
    if steps is None or steps >= timesteps:
        return list(range(timesteps))
    if steps < 1:
        raise UserError(f"ddpm.sample_steps={steps}: need at least 1 (or null for all steps)")
    grid = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()
    return sorted(set(grid.tolist()))


def vector_clip_box(train: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Per-coordinate bounds for ``NoiseSchedule.sample``'s ``clip`` on vectors: the training
    data's box widened by ``margin`` x its width on each side."""
    lo, hi = train.amin(dim=0), train.amax(dim=0)
    pad = margin * (hi - lo)
    return lo - pad, hi + pad


@dataclass
class Snapshot:
    """The reverse process at one point: ``step`` is the 1-based paper time (0 = the output)."""

    step: int
    x: Tensor


class NoiseSchedule:
    """The forward process q(x_t | x_0) of one β schedule, its loss and its ancestral sampler.

    Args:
        betas: β_1..β_T (float64 recommended).

    Example::

        schedule = NoiseSchedule(make_betas("linear", 1000))
        x_t, t, eps = schedule.training_triple(x0, generator)
        loss = schedule.loss(eps_net, x0, generator)
        x0_new = schedule.sample(eps_net, 500, (2,), generator, steps=100)
    """

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence in (0, 1)")
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self._device_cache: dict[tuple, dict[str, Tensor]] = {}

    @classmethod
    def from_config(
        cls, schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
    ):
        return cls(make_betas(schedule, timesteps, beta_start, beta_end))

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    # -- forward process ----------------------------------------------------------------------
    def _coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Per-sample coefficient ``name[t]`` shaped to broadcast against ``like``."""
        key = (like.device, like.dtype)
        cache = self._device_cache.get(key)
        if cache is None:
            cache = {
                "sqrt_ab": self.alpha_bar.sqrt(),
                "sqrt_1m_ab": (1 - self.alpha_bar).sqrt(),
            }
            cache = {k: v.to(device=like.device, dtype=like.dtype) for k, v in cache.items()}
            self._device_cache[key] = cache
        return cache[name][t].reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (t: 0-based indices, one per sample)."""
        return self._coef("sqrt_ab", t, x0) * x0 + self._coef("sqrt_1m_ab", t, x0) * eps

    def training_triple(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, t, eps)`` with t uniform in ``0..T-1`` and ε ~ N(0, I), drawn from ``generator``.

        The generator must live on ``x0``'s device (or be None for the global RNG).
        """
        t = torch.randint(0, self.timesteps, (len(x0),), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.q_sample(x0, t, eps), t, eps

    def loss(
        self, eps_net: Callable[[Tensor, Tensor], Tensor], x0: Tensor, generator=None
    ) -> Tensor:
        """The simple loss E||ε - ε_θ(x_t, t)||², averaged over samples and coordinates."""
        x_t, t, eps = self.training_triple(x0, generator)
        return torch.mean((eps_net(x_t, t) - eps) ** 2)

    # -- reverse process ----------------------------------------------------------------------
    def sampling_coefficients(
        self, steps: int | None = None, variance: str = "posterior"
    ) -> dict[str, Tensor]:
        """Coefficients of the reverse chain over the respaced indices (Nichol & Dhariwal §4).

        A sub-sequence s_0 < … < s_{K-1} = T-1 defines β'_k = 1 - ᾱ_{s_k} / ᾱ_{s_{k-1}}; with all
        T indices this is exactly Ho et al.'s sampler. ``variance``: ``posterior`` uses
        β̃_k = β'_k (1 - ᾱ'_{k-1}) / (1 - ᾱ'_k), ``beta`` uses β'_k (both in Ho et al.).
        """
        if variance not in ("posterior", "beta"):
            raise UserError(f"ddpm.variance={variance!r}: use posterior or beta")
        idx = torch.tensor(respaced_indices(self.timesteps, steps))
        ab = self.alpha_bar[idx]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        beta = 1 - ab / ab_prev
        posterior_var = beta * (1 - ab_prev) / (1 - ab)
        return {
            "t": idx,
            "sqrt_ab": ab.sqrt(),
            "sqrt_1m_ab": (1 - ab).sqrt(),
            # posterior mean = c_x0 · x̂_0 + c_xt · x_t
            "c_x0": beta * ab_prev.sqrt() / (1 - ab),
            "c_xt": (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab),
            "sigma": (posterior_var if variance == "posterior" else beta).sqrt(),
            "ab": ab,
            "ab_prev": ab_prev,
        }

    @torch.no_grad()
    def sample(
        self,
        eps_net: Callable[[Tensor, Tensor], Tensor],
        num_samples: int,
        data_shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        *,
        steps: int | None = None,
        variance: str = "posterior",
        clip: float | tuple[Tensor, Tensor] | None = None,
        batch_size: int | None = None,
        snapshots: int = 0,
        snapshot_samples: int | None = None,
        device=None,
        dtype=torch.float32,
        progress: Callable | None = None,
        sampler: str = "ancestral",
        eta: float = 0.0,
    ) -> tuple[Tensor, list[Snapshot]]:
        """Ancestral (Ho et al.) or DDIM (Song et al. 2021) sampling from x_T ~ N(0, I) to x_0.

        Args:
            eps_net: ``eps_net(x_t, t)`` with 0-based ``t``.
            steps: number of reverse steps (None = all T; fewer uses the respaced chain).
            clip: clip the predicted x̂_0 at every step to ``[-clip, clip]`` (images: 1.0) or to
                per-coordinate bounds ``(lo, hi)`` (vectors: the data's box). Without it, a sample
                that strays where the net never trained is multiplied by up to 1/sqrt(ᾱ_T).
            batch_size: samples per network call (None = all at once).
            snapshots: how many states of the chain to keep, evenly spaced, first = pure noise,
                last = the output (0 = none).
            snapshot_samples: keep only the first this many samples in each snapshot.
            progress: optional ``progress(done, total)`` callback per reverse step.
            sampler: ``ancestral`` (the posterior chain) or ``ddim`` (the non-Markovian chain of
                Song et al. eq. 12 over the same respaced indices; ``variance`` is unused).
            eta: DDIM's noise scale η (0 = deterministic, 1 = the ancestral variance).

        Returns:
            ``(samples [num_samples, *data_shape], snapshots)``.
        """
        if sampler not in SAMPLERS:
            raise UserError(f"ddpm.sampler={sampler!r}: use one of {', '.join(SAMPLERS)}")
        if eta < 0:
            raise UserError(f"ddpm.eta={eta}: DDIM's eta must be >= 0")
        coef = self.sampling_coefficients(steps, variance)
        step_fn = self._reverse_step if sampler == "ancestral" else self._ddim_step
        coef["eta"] = float(eta)
        if isinstance(clip, (tuple, list)):
            clip = tuple(torch.as_tensor(c).to(device=device, dtype=dtype) for c in clip)
        num_steps = len(coef["t"])
        keep_at = set()
        if snapshots > 0:
            keep_at = {
                int(round(v))
                for v in torch.linspace(0, num_steps, min(snapshots, num_steps + 1)).tolist()
            }
        batch_size = batch_size or num_samples
        outputs, kept = [], {}
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            # draw where the generator lives (a CPU generator may drive CUDA sampling)
            draw_on = generator.device if generator is not None else device
            x = torch.randn((n, *data_shape), generator=generator, device=draw_on, dtype=dtype).to(
                device
            )
            for done in range(num_steps + 1):
                if done in keep_at:
                    kept.setdefault(done, []).append(x.detach().cpu().clone())
                if done == num_steps:
                    break
                k = num_steps - 1 - done
                x = step_fn(eps_net, x, k, coef, generator, clip)
                if progress is not None:
                    progress(
                        done + 1 + start // batch_size * num_steps,
                        num_steps * math.ceil(num_samples / batch_size),
                    )
            outputs.append(x)
        snaps = []
        for done in sorted(kept):
            step = int(coef["t"][num_steps - 1 - done]) + 1 if done < num_steps else 0
            x_all = torch.cat(kept[done])
            snaps.append(
                Snapshot(step=step, x=x_all[:snapshot_samples] if snapshot_samples else x_all)
            )
        return torch.cat(outputs), snaps

    @staticmethod
    def _predict_x0(eps_net, x: Tensor, k: int, coef: dict, clip) -> tuple[Tensor, Tensor]:
        """``(x̂_0, ε̂)`` at respaced step ``k``: one network call for the whole batch."""
        t = torch.full((len(x),), int(coef["t"][k]), device=x.device, dtype=torch.long)
        eps = eps_net(x, t)
        x0_hat = (x - float(coef["sqrt_1m_ab"][k]) * eps) / float(coef["sqrt_ab"][k])
        if isinstance(clip, (tuple, list)):
            x0_hat = torch.maximum(torch.minimum(x0_hat, clip[1]), clip[0])
        elif clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        return x0_hat, eps

    @staticmethod
    def _noise(x: Tensor, generator) -> Tensor:
        noise = torch.randn(
            x.shape,
            generator=generator,
            device=generator.device if generator is not None else x.device,
            dtype=x.dtype,
        )
        return noise.to(x.device)

    def _reverse_step(self, eps_net, x: Tensor, k: int, coef: dict, generator, clip) -> Tensor:
        """One step x_{s_k} → x_{s_{k-1}} of the (respaced) ancestral chain."""
        x0_hat, _ = self._predict_x0(eps_net, x, k, coef, clip)
        mean = float(coef["c_x0"][k]) * x0_hat + float(coef["c_xt"][k]) * x
        if k == 0:
            return mean
        return mean + float(coef["sigma"][k]) * self._noise(x, generator)

    def _ddim_step(self, eps_net, x: Tensor, k: int, coef: dict, generator, clip) -> Tensor:
        """One DDIM step (Song et al. eq. 12): x' = √ᾱ' x̂_0 + √(1 - ᾱ' - σ²) ε̂ + σ z."""
        x0_hat, eps = self._predict_x0(eps_net, x, k, coef, clip)
        ab, ab_prev = float(coef["ab"][k]), float(coef["ab_prev"][k])
        if clip is not None:
            # the direction consistent with the clipped x̂_0
            eps = (x - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
        if k == 0:
            return x0_hat
        sigma = coef["eta"] * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        out = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            out = out + sigma * self._noise(x, generator)
        return out
