"""``task=ddpm``: train a DDPM with the noise model ``eps_net``, sample, score and draw.

Vector data (``dataset=swiss_roll|points``) is used in the datamodule's standardised units;
samples are scored against the held-out reference sample by sliced Wasserstein and MMD, each
beside its floor (the same metric between a seeded subset of the training sample and the
reference). Images (``dataset=cifar10|cifar100``): the datamodule's mean/std (or ZCA) input is
mapped back to [0, 1] with its ``transform.inverse`` and then to [-1, 1], the range Ho et al.
train in; samples are clipped to [-1, 1] and drawn as grids; ConvNet-FID/KID only with a local
feature network (``ddpm.feature_extractor``). Vector data with a ``decode_images`` map
(``dataset=cifar10_pca``) is scored as vectors and, decoded, as images, and drawn as both.
Data with an exact noise predictor (``exact_eps``: the 2-D suite, ``gmm``) also has it sampled
through the same chain and seeds and scored beside the model (``sw_oracle``, ``sw_ratio``, ...).

Files in the run directory: ``samples.npy`` (vectors, data coordinates) or ``samples.pt``
(images, uint8 [N, C, H, W]), ``samples_scatter.png`` / ``samples_grid.png``,
``reverse_process.png``, ``loss_curve.png``, ``eps_net.pt`` (weights used for sampling),
``checkpoints/last.ckpt``, and ``summary.json`` (train.py).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from datamodules.tensor_data import batch_loader
from lightning_modules.ddpm import DDPMModule
from lightning_modules.diffusion import image_metrics, metrics, oracles, plots
from lightning_modules.diffusion.schedules import NoiseSchedule, Snapshot, vector_clip_box
from lightning_modules.diffusion.steppers import make_stepper
from lightning_modules.errors import UserError
from lightning_modules.tasks.common import (
    ShuffleState,
    build_logger,
    build_trainer,
    epoch_checkpoints,
    instantiate_checked,
    log_config,
    require_finite,
)
from lightning_modules.utils.devices import peak_memory, reset_peak_memory
from lightning_modules.utils.seeds import derive_seed

log = logging.getLogger("ddpm")


@dataclass
class DiffusionData:
    """Training data in model space and what is needed to score and draw samples."""

    train: Tensor  # [N, *data_shape]
    images: bool
    reference: Tensor | None = None  # vectors: held-out real sample (model space)
    to_view: object = None  # model space -> data coordinates (vectors) or [0, 1] (images)
    test_images01: Tensor | None = None  # images: real test images in [0, 1] for FID/KID
    structure: object = None  # vectors: data coordinates -> {"mode_share", ...} (or None)
    decode: object = None  # latent vectors (cifar10_pca): model space -> images in [0, 1]
    exact_eps: object = None  # closed-form densities: alpha_bar -> the exact noise predictor

    def images01(self, x: Tensor) -> Tensor | None:
        """Model space → images in [0, 1] (images, or decoded latents), else None."""
        return self.to_view(x) if self.images else self.decode(x) if self.decode else None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_data(cfg: DictConfig) -> DiffusionData:
    dm = instantiate_checked(cfg.dataset)
    dm.prepare_data()
    dm.setup()
    if hasattr(dm, "num_classes"):
        # [0, 1] pixels → [-1, 1]: undo the classifier normalisation (mean/std or ZCA) first
        def to_unit(x):
            return dm.transform.inverse(x).clamp(0, 1)

        train = torch.cat(
            [to_unit(dm.train_x[i : i + 10000]) * 2 - 1 for i in range(0, len(dm.train_x), 10000)]
        )
        return DiffusionData(
            train=train.contiguous(),
            images=True,
            to_view=lambda x: (x.clamp(-1, 1) + 1) / 2,
            test_images01=to_unit(dm.test_x) if len(dm.test_x) else None,
        )
    return DiffusionData(
        train=dm.train_x,
        images=False,
        reference=dm.reference_x,
        to_view=dm.to_data_space,
        structure=getattr(dm, "structure_metric", None),
        decode=getattr(dm, "decode_images", None),
        exact_eps=getattr(dm, "exact_eps", None),
        test_images01=getattr(dm, "test_images01", None),
    )


def build_eps_net(cfg: DictConfig, data: DiffusionData, schedule: NoiseSchedule):
    """The configured noise model for this data shape (UserError on a mismatch).

    A noise model with a ``skip`` key (the FTT) also gets the schedule's ᾱ and the training
    data, to which its Gaussian skip predictor is fitted.
    """
    lo = data.train.amin(dim=0)
    hi = data.train.amax(dim=0)
    extra = {}
    if "skip" in cfg.eps_net:
        extra = {"alpha_bar": schedule.alpha_bar, "train_data": data.train}
    return instantiate_checked(
        cfg.eps_net,
        data_shape=data.data_shape,
        timesteps=schedule.timesteps,
        data_bounds=(lo, hi),
        **extra,
    )


def _dataset_name(cfg: DictConfig) -> str:
    """The ``dataset=`` choice when run through Hydra, else the config's name or class."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("dataset"))
    return str(cfg.dataset.get("name") or cfg.dataset._target_.rsplit(".", 1)[-1])


def _log_images(logger, key: str, paths: list[Path]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(p) for p in paths])


def _save_atomic(path: Path, save) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        save(f)
    tmp.replace(path)


class Sampler:
    """Draws, scores and pictures samples of a ``DDPMModule`` with the run's settings."""

    def __init__(self, cfg: DictConfig, data: DiffusionData, out_dir: Path, logger):
        self.d = cfg.ddpm
        self.seed = int(cfg.seed)
        self.data = data
        self.out_dir = out_dir
        self.logger = logger
        self.callback_s = 0.0
        self.clip = None
        if self.d.get("clip_x0", True):
            if data.images:
                self.clip = 1.0
            else:
                self.clip = vector_clip_box(data.train, float(self.d.get("clip_margin", 0.1)))
        default_n = 64 if data.images else len(data.reference)
        self.num_samples = int(self.d.num_samples or default_n)

    def draw(
        self, module: DDPMModule, num_samples: int, snapshots: int = 0, draw: int = 0, eps=None
    ):
        """Samples from the reverse chain seeded by ``derive_seed(seed, "ddpm_sample", draw)``;
        with ``eps``, of that predictor (the exact one) instead of the module's net."""
        g = torch.Generator(device=module.device).manual_seed(
            derive_seed(self.seed, "ddpm_sample", draw)
        )
        if eps is not None:
            return module.schedule.sample(
                eps, num_samples, self.data.data_shape, g, device=module.device, **self.chain()
            )
        return module.sample(
            num_samples, self.data.data_shape, g, snapshots=snapshots, **self.chain(),
            snapshot_samples=8 if self.data.images else None,
        )  # fmt: skip

    def chain(self) -> dict:
        """The reverse chain's settings (model and exact predictor alike)."""
        d = self.d
        return {"steps": d.sample_steps, "variance": d.variance, "sampler": d.sampler,
                "eta": float(d.eta), "clip": self.clip, "batch_size": d.sample_batch}  # fmt: skip

    def score(self, draws: list[Tensor], floors: dict | None = None) -> dict:
        """Image metrics of the first draw, or the vector metrics of all draws (module doc)."""
        if self.data.images:
            return self.image_metrics(draws[0])
        decoded = self.image_metrics(draws[0]) if self.data.decode else {}
        result = metrics.vector_sample_metrics(
            draws,
            self.data.reference,
            self.data.train,
            num_projections=int(self.d.sw_projections),
            floor_pairs=int(self.d.floor_pairs),
            sinkhorn_reg=float(self.d.sinkhorn_reg),
            sinkhorn_samples=int(self.d.sinkhorn_samples),
            seed=self.seed,
            floors=floors,
        )
        structure = metrics.structure_summary(
            self.data.structure, self.data.to_view, self.data.reference, draws
        )
        return {**result, **structure, **decoded}

    def image_metrics(self, samples: Tensor) -> dict:
        """ConvNet-FID/KID against the test images, beside the same of n training images."""
        d, n = self.d, len(samples)
        out = image_metrics.convnet_scores(
            self.data.images01(samples),
            self.data.test_images01,
            d.get("feature_extractor"),
            floor01=self.data.images01(self.data.train[:n]),
            kid_subsets=int(d.kid_subsets),
            kid_subset_size=int(d.kid_subset_size),
            seed=self.seed,
        )
        log.info(image_metrics.scores_line(out))
        return out

    def pictures(self, samples: Tensor, snaps, tag: str = "") -> list[Path]:
        reference = None if self.data.images else self.data.reference
        paths = plots.sample_pictures(
            samples, snaps, self.out_dir, view=self.data.to_view, reference=reference, tag=tag
        )
        if self.data.decode is not None:  # latents: the decoded samples (and test images) too
            grid = self.data.decode(samples[:64])
            paths.append(plots.image_grid(grid, self.out_dir / f"samples_grid{tag}.png"))
            if not tag:
                real = self.data.decode(self.data.reference[:64])
                paths.append(plots.image_grid(real, self.out_dir / "reference_decoded.png"))
        return paths

    def on_epoch_end(self, module: DDPMModule, epoch: int) -> None:
        """Every ``ddpm.sample_every`` epochs: a smaller sample, its metrics and picture."""
        every = int(self.d.sample_every or 0)
        if every <= 0 or (epoch + 1) % every:
            return
        start = time.perf_counter()
        n = min(self.num_samples, 16 if self.data.images else 1000)
        samples, _ = self.draw(module, n, draw=1)
        samples = samples.cpu()
        tag = f"_epoch{epoch + 1:04d}"
        paths = self.pictures(samples, [], tag)
        _log_images(self.logger, "samples", paths)
        if not self.data.images:
            # cheap: one draw, no floor band, no Sinkhorn
            ref = self.data.reference[: len(samples)]
            sw = metrics.sliced_wasserstein(
                samples[: len(ref)], ref, num_projections=int(self.d.sw_projections)
            )
            mmd = metrics.mmd_rbf(samples[: len(ref)], ref)
            module.log_dict({"val/sw": sw, "val/mmd": mmd}, rank_zero_only=True)
            log.info("epoch %d: SW %.4f  MMD %.4f", epoch + 1, sw, mmd)
        self.callback_s += time.perf_counter() - start


TT_OPTIMIZERS = ("als", "dmrg", "riemannian")


@dataclass
class Run:
    """What :func:`build` puts together and the later parts read."""

    cfg: DictConfig
    out_dir: Path
    data: DiffusionData
    schedule: NoiseSchedule
    module: DDPMModule
    sampler: Sampler
    logger: object
    trainer: object
    loader: object
    params: int
    flops: int | None
    timings: dict = field(default_factory=dict)


def stepper_options(cfg: DictConfig, name: str) -> dict:
    """The keyword options of the ``ddpm.optimizer=name`` stepper, read from its config block."""
    d = cfg.ddpm
    if name in ("adam", "sgd"):
        options = {"lr": d.lr, "weight_decay": d.weight_decay, "grad_clip": d.grad_clip}
        return {**options, "momentum": d.momentum} if name == "sgd" else options
    block = OmegaConf.to_container(cfg.get(name) or OmegaConf.create({}), resolve=True)
    block.pop("steps", None)  # read by the task (training steps), not by the optimiser
    return block


def build(cfg: DictConfig, out_dir: Path) -> Run:
    """Data, schedule, noise model, logger, module, loader and trainer from the config."""
    d = cfg.ddpm
    data = load_data(cfg)
    schedule = NoiseSchedule.from_config(
        d.schedule, int(d.timesteps), float(d.beta_start), float(d.beta_end)
    )
    eps_net = build_eps_net(cfg, data, schedule)
    if d.get("feature_extractor"):  # a bad file stops the run before training, not after
        if data.test_images01 is None:
            raise UserError("ddpm.feature_extractor scores images: dataset=cifar10|cifar100|*_pca")
        image_metrics.feature_network(d.feature_extractor, tuple(data.test_images01.shape[1:]))
    if d.optimizer in TT_OPTIMIZERS and len(data.train) < 2:
        raise UserError(f"ddpm.optimizer={d.optimizer} needs a training set")
    if int(d.batch_size) > len(data.train):
        raise UserError(
            f"ddpm.batch_size={d.batch_size} is larger than the training set ({len(data.train)})"
        )
    params = sum(p.numel() for p in eps_net.parameters())
    flops = eps_net.flops_per_sample() if hasattr(eps_net, "flops_per_sample") else None
    log.info(
        "eps_net=%s: %s parameters, %s forward FLOPs per sample; data %s x %d",
        cfg.eps_net.get("name"),
        f"{params:,}",
        f"{flops:,}" if flops is not None else "n/a",
        data.data_shape,
        len(data.train),
    )
    options = stepper_options(cfg, d.optimizer)
    make_stepper(d.optimizer, eps_net, **options)  # a bad option stops here: no logger, no Trainer
    logger = build_logger(cfg)
    log_config(logger, cfg)
    sampler = Sampler(cfg, data, out_dir, logger)
    ema = d.ema
    if ema is not None and d.optimizer in TT_OPTIMIZERS:
        # ALS/DMRG/TT-SVD re-gauge the cores every step: an average of cores is not an average
        log.warning(
            "ddpm.ema=%s ignored for ddpm.optimizer=%s (cores change gauge)", ema, d.optimizer
        )
        ema = None
    steps = d.get("steps")
    if steps is None and d.optimizer in ("als", "dmrg"):
        steps = int(cfg[d.optimizer].steps)
        log.info(
            "ddpm.optimizer=%s: %d steps (%s.steps; ddpm.steps overrides)",
            d.optimizer,
            steps,
            d.optimizer,
        )
    module = DDPMModule(
        eps_net,
        schedule,
        lambda net: make_stepper(d.optimizer, net, **options),
        train_data=data.train,
        ema_decay=ema,
        seed=int(cfg.seed),
        describe=f"ddpm.optimizer={d.optimizer}, ddpm.lr={d.lr}",
        on_epoch_end=sampler.on_epoch_end,
        max_steps=int(steps) if steps else None,
    )
    loader = batch_loader(
        data.train, batch_size=int(d.batch_size), shuffle=True, seed=int(cfg.seed), drop_last=True
    )
    ckpt_dir = out_dir / "checkpoints"
    # the stepper owns the optimiser (ALS, DMRG, Riemannian have none Lightning could step)
    warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`.*")
    trainer = build_trainer(
        cfg,
        logger=logger,
        callbacks=[epoch_checkpoints(ckpt_dir), ShuffleState(loader.generator)],
        max_epochs=-1 if steps else int(d.epochs),  # a step budget: the module stops the fit
    )
    return Run(
        cfg, out_dir, data, schedule, module, sampler, logger, trainer, loader, params, flops
    )


def train(r: Run) -> None:
    """Fit (resuming from ``checkpoints/last.ckpt`` with ``resume=true``); time and memory."""
    device = r.trainer.strategy.root_device
    reset_peak_memory(device)
    last = r.out_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    r.trainer.fit(
        r.module,
        train_dataloaders=r.loader,
        ckpt_path=str(last) if r.cfg.resume and last.exists() else None,
    )
    r.timings["train_s"] = time.perf_counter() - start - r.sampler.callback_s
    r.timings["peak_mem_mb"], r.timings["peak_mem_kind"] = peak_memory(device)


def sample(r: Run) -> tuple[list[Tensor], list[Snapshot]]:
    """``ddpm.metric_draws`` independent draws (vectors; images: one); the first one is timed."""
    device = r.trainer.strategy.root_device
    r.module.to(device)
    start = time.perf_counter()
    n = r.sampler.num_samples
    first, snaps = r.sampler.draw(r.module, n, snapshots=int(r.cfg.ddpm.snapshots or 0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    r.timings["sample_s"] = time.perf_counter() - start
    draws = [first.cpu()]
    if not r.data.images:
        for index in draw_indices(r.cfg)[1:]:
            draws.append(r.sampler.draw(r.module, n, draw=index)[0].cpu())
    return draws, snaps


def draw_indices(cfg: DictConfig) -> list[int]:
    """The seed indices of the scored draws: 0 (the saved one), then 101, 102, ..."""
    return [0, *range(101, 100 + int(cfg.ddpm.metric_draws))]


def compare_to_oracle(r: Run, result: dict) -> dict:
    """The exact noise predictor (``ddpm.oracle``) sampled and scored as the model, and ratios."""
    make = r.data.exact_eps if r.cfg.ddpm.get("oracle", True) else None
    if (eps := make(r.schedule.alpha_bar) if make is not None else None) is None:
        return {}

    def draw(i: int) -> Tensor:
        return r.sampler.draw(r.module, r.sampler.num_samples, draw=i, eps=eps)[0].cpu()

    out = oracles.oracle_comparison(result, draw, draw_indices(r.cfg), r.sampler.score)
    log.info("\n".join(oracles.oracle_lines({**result, **out})))
    return out


def score(r: Run, draws: list[Tensor]) -> dict:
    start = time.perf_counter()
    result = r.sampler.score(draws)
    r.timings["score_s"] = time.perf_counter() - start
    for line in metrics.metrics_lines(result):
        log.info(line)
    return result


def save(r: Run, samples: Tensor, snaps: list[Snapshot]) -> None:
    """Samples, sampling weights, pictures and the loss curve into the run directory."""
    data, out_dir, cfg = r.data, r.out_dir, r.cfg
    hint = f"lower ddpm.lr (now {cfg.ddpm.lr}) or set ddpm.grad_clip"
    require_finite("samples and weights", [samples, *r.module.sampling_net.parameters()], hint)
    if data.images:
        u8 = (data.to_view(samples) * 255).round().to(torch.uint8)
        _save_atomic(out_dir / "samples.pt", lambda f: torch.save(u8, f))
    else:
        view = data.to_view(samples).numpy()
        _save_atomic(out_dir / "samples.npy", lambda f: np.save(f, view))
    weights = r.module.sampling_net.state_dict()
    eps_cfg = OmegaConf.to_container(cfg.eps_net, resolve=True)
    _save_atomic(
        out_dir / "eps_net.pt",
        lambda f: torch.save({"state_dict": weights, "eps_net": eps_cfg}, f),
    )
    paths = r.sampler.pictures(samples, snaps)
    steps_axis, losses = zip(*r.module.loss_history) if r.module.loss_history else ((), ())
    paths.append(
        plots.loss_curve(
            steps_axis,
            losses,
            out_dir / "loss_curve.png",
            title=f"DDPM loss, eps_net={cfg.eps_net.get('name')}",
        )
    )
    _log_images(r.logger, "pictures", paths)


def summarise(r: Run, result: dict, num_samples: int) -> dict:
    """The summary.json payload; logs the cost line and the final metrics to the logger."""
    d, t = r.cfg.ddpm, r.timings
    losses = [loss for _, loss in r.module.loss_history]
    sample_steps = d.sample_steps or r.schedule.timesteps
    net = r.module.eps_net
    cost = {
        "params": sum(p.numel() for p in net.parameters()),  # DMRG may change the ranks
        "params_initial": r.params,
        "flops_per_sample": net.flops_per_sample() if hasattr(net, "flops_per_sample") else None,
        "train_s": t["train_s"],
        "sample_s": t["sample_s"],
        "score_s": t["score_s"],
        "peak_mem_mb": t["peak_mem_mb"],
        "peak_mem_kind": t["peak_mem_kind"],
    }
    log.info(
        "cost: %s parameters, train %.1f s, sampling %.1f s (%d samples, %s %s steps), "
        "peak memory %.0f MB (%s)",
        f"{cost['params']:,}", t["train_s"], t["sample_s"], num_samples, sample_steps,
        d.sampler, t["peak_mem_mb"], t["peak_mem_kind"],
    )  # fmt: skip
    if r.logger:
        flat = {**result, **cost}
        r.logger.log_metrics(
            {f"final/{k}": v for k, v in flat.items() if isinstance(v, (int, float))}
        )
    extra = {"bond_ranks": list(net.ranks[1:-1])} if hasattr(net, "ranks") else {}
    return {
        **result,
        **cost,
        **extra,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "steps": r.module.steps_done,
        "epochs": r.trainer.current_epoch,
        "num_samples": num_samples,
        "sampler": d.sampler,
        "eta": float(d.eta),
        "sample_steps": sample_steps,
        "eps_net": r.cfg.eps_net.get("name"),
        "basis": r.cfg.eps_net.get("basis"),
        "optimizer": d.optimizer,
        "dataset": _dataset_name(r.cfg),
        "objective": result.get("sw", result.get("convnet_fid")),
    }


def run(cfg: DictConfig, out_dir: Path) -> dict:
    r = build(cfg, out_dir)
    train(r)
    if not r.trainer.is_global_zero:
        return {"rank": r.trainer.global_rank}
    draws, snaps = sample(r)
    result = score(r, draws)
    result.update(compare_to_oracle(r, result))
    save(r, draws[0], snaps)
    return summarise(r, result, len(draws[0]))
