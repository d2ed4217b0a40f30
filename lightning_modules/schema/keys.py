"""Every configuration key and what it may hold: ONE line per key.

Adding a key to a ``conf/`` file? Add its line here, in its block (``tests/test_schema.py``
fails for any key of any ``conf/`` option that has none). The kinds are in ``kinds.py``:
``count()`` whole numbers >= 1 (``count(0)`` >= 0, ``le=`` a stated bound), ``positive()``,
``nonneg()``, ``fraction()`` [0, 1], ``number(gt=, ge=, lt=, le=)``, ``flag()`` true/false,
``one_of(...)``, ``text()``, ``items(kind)`` lists, ``auto_or(kind)``, ``a | b`` either;
``null=True`` where null has a documented meaning. Rules between keys are in ``relations.py``.
"""

from __future__ import annotations

from lightning_modules.schema.kinds import (
    Kind,
    Text,
    auto_or,
    count,
    flag,
    fraction,
    items,
    nonneg,
    number,
    one_of,
    positive,
    table,
    text,
)

# -------------------------------------------------------------------- shared kinds and bounds
#: Lightning's seed_everything draws a random seed (from the clock) outside [0, 2^32 - 1]
SEED = count(0, le=2**32 - 1)
MOMENTUM = number(ge=0, lt=1)  # SGD momentum: >= 1 never forgets a step and diverges
NETS = ("convnet", "alexnet", "vgg11", "resnet18", "resnet18_ap")
DSA_GROUPS = ("color", "brightness", "saturation", "contrast", "crop", "cutout", "flip")
DSA_GROUPS += ("scale", "rotate")
MATCHING = ("dc", "dsa", "dm", "cafe", "kip")
TASKS = ("classify", "coreset", "ddpm", "distill", "evaluate", "reproduce", "teacher")
#: memory bounds (docs/configuration/validation.md): sizes that allocate in proportion
MAX_TIMESTEPS = 100_000  # ~10 float64 schedule tensors of T entries, T reverse steps per sample
MAX_POINTS = 10_000_000  # toy/vector samples held in memory (x D floats, several copies)
MAX_SINKHORN = 20_000  # the Sinkhorn cost matrix is n^2 float64 (20,000: 3.2 GB)
MAX_PROJECTIONS = 100_000  # sliced Wasserstein: samples x projections floats
MAX_THREADS = 1024


class DsaStrategy(Kind):
    """Groups joined by ``_`` (``color_crop_cutout_flip_scale_rotate``) or ``none``."""

    def _accepts(self, value) -> bool:
        if not isinstance(value, str):
            return False
        groups = [g for g in value.strip().lower().split("_") if g]
        return value.strip().lower() in ("", "none") or all(g in DSA_GROUPS for g in groups)

    def _text(self) -> str:
        return f"'none' or groups of {', '.join(DSA_GROUPS)} joined by '_'"


DSA = DsaStrategy()
PATH = text(null=True, what="a path")
TARGET = text(null=True, what="a class path")

KEYS: dict[str, Kind] = {
    # ---------------------------------------------------------------------------- top level
    "seed": SEED,
    "ipc": count(),
    "resume": flag(),
    "threads": count(le=MAX_THREADS, null=True),
    "table": one_of("row", "cross_arch", "kip"),
    "paths.data_dir": text(what="a path"),
    "paths.cache_dir": text(what="a path"),
    "paths.runs_dir": text(what="a path"),
    "paths.output_dir": text(what="a path"),
    # ------------------------------------------------------------------- task=classify (task.*)
    "task.name": one_of(*TASKS),
    "task.epochs": count(),
    "task.lr": positive(),
    "task.momentum": MOMENTUM,
    "task.weight_decay": nonneg(),
    "task.schedule": one_of("cosine", "step", "constant"),
    "task.val_every": count(),
    # -------------------------------------------------------------------------- task=coreset
    "coreset.method": one_of("random", "herding", "forgetting"),
    "coreset.out": PATH,
    "coreset.features": one_of("auto", "expert", "train"),
    "coreset.store": PATH,
    "coreset.expert_index": count(0, null=True),
    "coreset.train_epochs": count(),
    "coreset.forgetting_epochs": count(),
    "coreset.never_learned": one_of("first", "last"),
    "coreset.lr": positive(),
    "coreset.momentum": MOMENTUM,
    "coreset.weight_decay": nonneg(),
    "coreset.batch_size": count(),
    "coreset.dsa": flag(),
    "coreset.dsa_strategy": DSA,
    # ----------------------------------------------------------------------------- task=ddpm
    "ddpm.timesteps": count(le=MAX_TIMESTEPS),
    "ddpm.schedule": one_of("linear", "cosine"),
    "ddpm.beta_start": number(gt=0, lt=1),
    "ddpm.beta_end": number(gt=0, lt=1),
    "ddpm.variance": one_of("posterior", "beta"),
    "ddpm.epochs": count(),
    "ddpm.steps": count(null=True),
    "ddpm.batch_size": count(),
    "ddpm.lr": nonneg(),  # 0: the start is evaluated untrained (PCA skip alone, k-means start)
    "ddpm.optimizer": one_of("adam", "sgd", "als", "dmrg", "riemannian"),
    "ddpm.momentum": MOMENTUM,
    "ddpm.weight_decay": nonneg(),
    "ddpm.grad_clip": positive(null=True),
    "ddpm.ema": number(ge=0, lt=1, null=True),
    "ddpm.sample_every": count(0),
    "ddpm.num_samples": count(le=MAX_POINTS, null=True),
    "ddpm.sampler": one_of("ancestral", "ddim"),
    "ddpm.eta": fraction(),
    "ddpm.oracle": flag(),
    "ddpm.sample_steps": count(null=True),
    "ddpm.sample_batch": count(null=True),
    "ddpm.clip_x0": flag(),
    "ddpm.clip_margin": nonneg(),
    "ddpm.snapshots": count(0, le=100),
    "ddpm.sw_projections": count(le=MAX_PROJECTIONS),
    "ddpm.metric_draws": count(),
    "ddpm.floor_pairs": count(),
    "ddpm.sinkhorn_reg": positive(),
    "ddpm.sinkhorn_samples": count(le=MAX_SINKHORN),
    "ddpm.feature_extractor": PATH,
    "ddpm.kid_subsets": count(),
    "ddpm.kid_subset_size": count(),
    "als.ridge": nonneg(),
    "als.sweeps": count(),
    "als.samples": auto_or(count()),
    "als.batch": count(),
    "als.fixed": flag(),
    "als.steps": count(),
    "dmrg.ridge": nonneg(),
    "dmrg.sweeps": count(),
    "dmrg.samples": count(),
    "dmrg.batch": count(),
    "dmrg.fixed": flag(),
    "dmrg.max_rank": count(),
    "dmrg.tol": number(ge=0, lt=1),
    "dmrg.max_unknowns": count(),
    "dmrg.steps": count(),
    "riemannian.lr": number(gt=0, le=1),  # a fraction of the line minimiser
    "riemannian.armijo": flag(),
    "riemannian.shrink": number(gt=0, lt=1),
    "riemannian.max_backtracks": count(0),
    # -------------------------------------------------------------------------- task=distill
    "distill.preset": one_of("auto", "none"),
    "distill.eps": number(ge=0, lt=1, null=True),  # null: the method's own (mtt 0.1, datm/pad 0)
    "distill.iterations": count(null=True),
    "distill.syn_steps": count(null=True),
    "distill.expert_epochs": count(null=True),
    "distill.max_start_epoch": count(null=True),
    "distill.batch_syn": one_of("all", null=True) | count(),
    "distill.lr_img": positive(null=True),
    "distill.lr_lr": positive(null=True),
    "distill.lr_teacher": positive(null=True),
    "distill.momentum": MOMENTUM,
    "distill.lr_floor": nonneg(),
    "distill.init": one_of("real", "noise", "correct", null=True),
    "distill.unroll": one_of("full", "recompute"),
    "distill.offload": auto_or(flag()),
    "distill.dsa": flag(),
    "distill.dsa_strategy": DSA,
    "distill.trajectories": PATH,
    "distill.max_experts": count(null=True),
    "distill.eval_every": count(0),
    "distill.eval_nets": items(one_of(*NETS)),
    "distill.eval_num": count(),
    "distill.eval_epochs": count(),
    "distill.eval_batch_size": count(),
    "distill.final_eval": flag(),
    "distill.checkpoint_every": count(),
    "distill.max_bad_steps": count(),
    # ------------------------------------------------------------------------- task=evaluate
    "evaluate.set": PATH,
    "evaluate.nets": items(one_of(*NETS)),
    "evaluate.num_eval": count(),
    "evaluate.protocol": one_of("mtt", "half"),
    "evaluate.epochs": count(),
    "evaluate.net_options": table("{net: {option: value}} of net.* options", null=True),
    "evaluate.lr": positive(null=True),
    "evaluate.batch_size": count(),
    "evaluate.momentum": MOMENTUM,
    "evaluate.weight_decay": nonneg(),
    "evaluate.dsa_strategy": DSA,
    "evaluate.device": one_of("auto", "cpu", "cuda") | Text(prefix="cuda:", what="cuda:<index>"),
    "evaluate.together": auto_or(flag()),
    "evaluate.eval_batch_size": count(),
    "evaluate.grid": flag(),
    "evaluate.labels": one_of("both", "soft", "hard"),
    "evaluate.soft_temperature": positive(),
    "evaluate.ddranking.enabled": flag(),
    "evaluate.ddranking.random_set": PATH,
    "evaluate.ddranking.teacher": PATH,
    "evaluate.ddranking.teacher_epoch": count(-1),  # -1: the last snapshot
    "evaluate.ddranking.teacher_experts": count(null=True),
    "evaluate.ddranking.full_acc": number(ge=0, le=100, null=True)
    | table("{net: accuracy %}")
    | text(what="a results.json path"),
    "evaluate.ddranking.full_cache": text(what="a path"),
    "evaluate.ddranking.full_epochs": count(),
    "evaluate.ddranking.full_num_eval": count(),
    "evaluate.ddranking.ars": flag(),
    "evaluate.ddranking.lrs_weight": fraction(),
    "evaluate.ddranking.ars_weight": fraction(),
    # ------------------------------------------------------------------------ task=reproduce
    "reproduce.eps": number(gt=0, lt=1),  # the eps = 0 column (MTT) is always run
    "reproduce.methods": items(
        one_of("random", "forgetting", "herding", *MATCHING, "mtt", "pruning", "datm", "pad")
    ),
    "reproduce.nets": items(one_of(*NETS), null=True),
    "reproduce.kip_widths": items(count()),
    "reproduce.full": flag(),
    "reproduce.full_epochs": count(null=True),
    "reproduce.workdir": PATH,
    "reproduce.experts_dir": PATH,
    "reproduce.experts": count(null=True),
    "reproduce.expert_epochs": count(null=True),
    "reproduce.iterations": count(null=True),
    "reproduce.syn_steps": count(null=True),
    "reproduce.max_start_epoch": count(null=True),
    "reproduce.eval_epochs": count(null=True),
    "reproduce.num_eval": count(null=True),
    "reproduce.fanout": flag(),
    "reproduce.expert_jobs": count(),
    "reproduce.method_keys": table("{method: {key: value}} of method.* keys"),
    # -------------------------------------------------------------------------- task=teacher
    "teacher.num_experts": count(),
    "teacher.first_index": count(0),
    "teacher.epochs": count(),
    "teacher.lr": positive(),
    "teacher.momentum": MOMENTUM,
    "teacher.weight_decay": nonneg(),
    "teacher.batch_size": count(),
    "teacher.dsa": flag(),
    "teacher.dsa_strategy": DSA,
    "teacher.out": PATH,
    "teacher.optimizer": one_of("sgd", "gsam"),
    "teacher.gsam_rho": positive(),
    "teacher.gsam_alpha": nonneg(),
    "teacher.curriculum": one_of("none", "el2n", "grand"),
    "teacher.score_epochs": count(0),
    "teacher.score_repeats": count(),
    "teacher.init_ratio": number(gt=0, le=1),
    "teacher.add_end_epoch": count(0),
    "teacher.rm_epochs": items(count(0), empty=True),
    "teacher.rm_easy_ratios": items(number(ge=0, lt=1), empty=True),
    # ---------------------------------------------------------- dataset= (every option's keys)
    "dataset._target_": TARGET,
    "dataset.name": one_of("cifar10", "cifar100", "digits", "breast_cancer", "wine", "diabetes"),
    "dataset.data_dir": text(what="a path"),
    "dataset.cache_dir": text(what="a path"),
    "dataset.download": flag(),
    "dataset.zca": flag(null=True),
    "dataset.zca_eps": positive(),
    "dataset.train_per_class": count(null=True),
    "dataset.test_per_class": count(null=True),
    "dataset.batch_size": count(),
    "dataset.eval_batch_size": count(),
    "dataset.subset_seed": SEED,
    "dataset.seed": SEED,
    "dataset.dim": count(le=3072),  # vectors: 2-3 (swiss roll), PCA: at most 3 x 32 x 32
    "dataset.num_samples": count(le=MAX_POINTS),
    "dataset.num_reference": count(2, le=MAX_POINTS),  # a sample the metrics compare against
    "dataset.components": count(le=10_000),  # gmm: K means held as [K, D]
    "dataset.separation": positive(),  # gmm: smallest distance of two means, in component stds
    "dataset.scale": positive(),  # gmm: component std
    "dataset.noise": nonneg(),
    "dataset.density": one_of("moons", "circles", "8gaussians", "checkerboard", "pinwheel")
    | one_of("2spirals"),
    "dataset.band": positive(),
    "dataset.path": PATH,
    "dataset.reference_fraction": number(gt=0, lt=1),
    # ------------------------------------------------------------------------------ net=
    "net._target_": TARGET,
    "net.name": one_of(*NETS),
    "net.depth": count(),
    "net.width": count(),
    "net.norm": one_of("instancenorm", "batchnorm", "layernorm", "groupnorm", "none"),
    "net.act": one_of("relu", "leakyrelu", "sigmoid", "gelu"),
    "net.pool": one_of("avgpool", "maxpool", "none"),
    # -------------------------------------------------------------------------- eps_net=
    "eps_net._target_": TARGET,
    "eps_net.name": text(what="a name"),
    "eps_net.seed": SEED,
    "eps_net.width": count(),
    "eps_net.depth": count(),
    "eps_net.hidden": count(null=True),
    "eps_net.activation": one_of("silu", "relu", "gelu", "tanh"),
    "eps_net.time_in_blocks": flag(),
    "eps_net.time_dim": count(),
    "eps_net.residual": flag(),
    "eps_net.param": one_of("eps", "density"),
    "eps_net.bump": one_of("gaussian", "box"),
    "eps_net.basis": one_of("bspline", "legendre", "fourier"),
    "eps_net.degree": count(0),
    "eps_net.num_basis": count(),
    "eps_net.rank": count(),
    "eps_net.time": one_of("core", "additive"),
    "eps_net.time_basis": count(),
    "eps_net.output": one_of("auto", "per_coordinate", "core"),
    "eps_net.init": one_of("auto", "identity", "linear", "random", "histogram"),
    "eps_net.init_noise": nonneg(),
    "eps_net.skip": one_of("auto", "pca", "gaussian", "none"),
    "eps_net.skip_components": count(),
    "eps_net.core_lr_scale": auto_or(positive()),
    "eps_net.margin": positive(),
    "eps_net.ch": count(),
    "eps_net.ch_mult": items(count()),
    "eps_net.num_res_blocks": count(),
    "eps_net.attn_resolutions": items(count(), empty=True),
    "eps_net.dropout": number(ge=0, lt=1),
    "eps_net.norm_groups": count(),
    # --------------------------------------------------------------------------- method=
    "method.name": one_of("mtt", "datm", "pad", *MATCHING),
    "method.min_start_epoch": count(0, null=True),
    "method.current_max_start_epoch": count(null=True),
    "method.expansion_end_epoch": count(null=True),
    "method.lr_y": nonneg(null=True),
    "method.momentum_y": MOMENTUM,
    "method.threshold": positive(null=True),
    "method.label_epoch": count(-1),  # -1: the last snapshot
    "method.depth_ratio": number(ge=0, lt=1, null=True),
    "method.loss_ratio": number(ge=0, lt=1, null=True),
    "method.outer_loop": count(null=True),
    "method.inner_loop": count(null=True),
    "method.lr_net": positive(),
    "method.batch_real": count(),
    "method.batch_train": count(),
    "method.batched": auto_or(flag()),
    "method.class_chunk": count(null=True),
    "method.layer_weights": items(nonneg(), null=True),
    "method.beta": nonneg(),
    "method.lambda_outer": nonneg(),
    "method.lambda_inner": nonneg(),
    "method.window": count(),
    "method.batch_test": count(),
    "method.max_outer": count(),
    "method.max_inner": count(),
    "method.lr_milestones": items(count(), null=True, empty=True),
    "method.kernel": one_of("ntk_fc", "nngp_fc", "rf_convnet"),
    "method.reg": positive(),
    "method.chunk": count(null=True),
    "method.rf_models": count(),
    "method.depth": count(0),
    "method.w_var": positive(),
    "method.b_var": nonneg(),
    "method.learn_labels": flag(),
    "method.lr_labels": positive(null=True),
    # ----------------------------------- trainer= (Lightning's Trainer; +trainer.<key> is open)
    "trainer._target_": TARGET,
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.devices": auto_or(count()) | items(count(0)) | text(what="a device list '0,1'"),
    "trainer.strategy": text(what="a strategy name (auto, ddp, ...)"),
    "trainer.num_nodes": count(),
    "trainer.precision": one_of("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true")
    | one_of("bf16-true", "64", "32", "16", "bf16"),
    "trainer.log_every_n_steps": count(),
    "trainer.num_sanity_val_steps": count(0),
    "trainer.enable_progress_bar": flag(),
    "trainer.deterministic": flag() | one_of("warn"),
    "trainer.sync_batchnorm": flag(),
    # ------------------------------------- logger= (the logger class's keys; +logger.<key> open)
    "logger._target_": TARGET,
    "logger.save_dir": text(what="a path"),
    "logger.name": text(null=True),
    "logger.version": one_of("", null=True) | text() | count(0),
    "logger.flush_logs_every_n_steps": count(),
    "logger.project": text(),
    "logger.group": text(null=True),
    "logger.tags": items(text(), null=True, empty=True),
    "logger.offline": flag(),
    "logger.log_model": flag() | one_of("all"),
}

#: keys no conf/ file has that a user adds with ``+`` (``+trainer.max_time=00:00:05:00``); the
#: Trainer takes them as they are, so a value that would silently misbehave is refused here
EXTRA: dict[str, Kind] = {
    "trainer.max_time": text(null=True, what="a duration DD:HH:MM:SS"),
    "trainer.gradient_clip_val": nonneg(null=True),  # a negative norm would flip the gradients
    "trainer.gradient_clip_algorithm": one_of("norm", "value", null=True),
    "trainer.accumulate_grad_batches": count(),
    "trainer.limit_train_batches": number(gt=0, le=1) | count(),
    "trainer.limit_val_batches": number(ge=0, le=1) | count(0),
    "trainer.limit_test_batches": number(gt=0, le=1) | count(),
    "trainer.val_check_interval": number(gt=0, le=1) | count(),
    "trainer.benchmark": flag(null=True),
    "trainer.detect_anomaly": flag(),
    "trainer.fast_dev_run": flag() | count(0),
}

#: prefixes whose extra keys (``+trainer.max_time=...``) go to a library that checks them
#: itself; its errors are translated to one line naming the key (``schema.translate``)
OPEN = ("trainer.", "logger.")
#: mappings whose entries are checked as other keys: ``reproduce.method_keys.dsa.outer_loop``
#: as ``method.outer_loop``, ``evaluate.net_options.convnet.width`` as ``net.width``
NESTED = {"reproduce.method_keys": ("method", MATCHING), "evaluate.net_options": ("net", NETS)}
