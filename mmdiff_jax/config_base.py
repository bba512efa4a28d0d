"""The base experiment config: every field with its default and a one-line comment. Experiment files under
`configs/` start from `get_base_config()` and override fields; `main.py` locks the result, so a typo in an
override (`--config.optim.lrr=...`) is an error."""

from __future__ import annotations

import dataclasses

import ml_collections

from mmdiff_jax.modalities import ModalitySpec


def modality(kind: str, **fields) -> dict:
    """`config.modalities.<name>` of an auxiliary modality: `fields` over every ModalitySpec default, so that the
    command line can override any field (`--config.modalities.label.dropout=0.3`) and not only those a config spells
    out (ml_collections refuses an override of a field the config does not have). The primary image is written as a
    plain dict (`dict(kind="image", shape=...)`): the auxiliary fields mean nothing to it."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModalitySpec) if f.name not in ("name", "kind")}
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        raise ValueError(f"modality({kind!r}): unknown field(s) {unknown}; allowed: {sorted(defaults)}.")
    return {"kind": kind, **defaults, **fields}


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init and training RNG
    c.latent_shape = (8, 8, 1)  # the diffusion space: the primary image's shape [H, W, C]
    c.primary = "image"  # the modality that is the latent (identity encoder)
    # Modalities: name -> {kind, shape, num_classes, weight_schedule, weight_scale, loss_weight, seed, dropout,
    # head_loss_when_dropped, code_grid, head, head_width, to_denoiser} (mmdiff_jax/modalities.py, ModalitySpec);
    # write an auxiliary one as config_base.modality(kind, **fields) so that every field can be overridden on the
    # command line.
    c.modalities = ml_collections.ConfigDict()
    c.modalities.image = dict(kind="image", shape=(8, 8, 1))

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # embedded dataset (mmdiff_jax/data/sources.py)
    c.data.source_kwargs = ml_collections.ConfigDict({"test_fraction": 0.2, "seed": 0})  # the source's own options (docs/data.md)
    # File sources (folder, imagenet64, array_record; data/sources/): the side of the square images (folder: resize
    # and centre-crop to it; 0: the data's own), the folder's colour channels (3 RGB, 1 grey), and the input pipeline.
    c.data.image_size = 0
    c.data.channels = 3  # folder: 3 (RGB) or 1 (grey)
    c.data.flip = False  # random horizontal flips (an image and its mask together)
    c.data.workers = 0  # grain worker processes reading and decoding examples (0: in the training process)
    c.data.worker_buffer = 8  # batches each worker prepares ahead
    c.data.global_batch_size = 128  # across all devices and processes
    c.data.shuffle_seed = 0  # the order of the training examples
    # A masked copy of data `source` under modality `into` ('' = none): `count` black squares of side `square`,
    # new ones for every example in every epoch (data/masking.py).
    c.data.masking = ml_collections.ConfigDict({"source": "image", "into": "", "square": 3, "count": 2})
    c.data.vectors = ml_collections.ConfigDict()  # vector modality name -> "evaluator" | path of an .npz (data/vectors.py)

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "unet"  # unet (the small U-Net, models/unet.py) | adm (Dhariwal & Nichol's, models/adm.py)
    c.model.channels = (32, 48)  # U-Net width per resolution level
    c.model.blocks_per_level = 1  # residual blocks per resolution level
    c.model.width = 0  # > 0: model.channels = width x ADM's multipliers for the image side (data/shapes.py)
    c.model.groups = 8  # GroupNorm groups
    c.model.temb_dim = 128  # time-embedding width
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, optimizer, loss math stay float32)
    # adm only: attention at these resolutions (pixels per side), its head width, AdaGN, BigGAN up/down, dropout
    c.model.attention_resolutions = (32, 16, 8)
    c.model.num_head_channels = 64  # adm: channels per attention head
    c.model.scale_shift_norm = True  # adm: AdaGN (the time embedding scales and shifts the normalised features)
    c.model.resblock_updown = True  # adm: BigGAN residual blocks resample
    c.model.dropout = 0.0  # adm: dropout in the residual blocks (training only)
    # ADM's learned reverse variance: the backbone also outputs v, and log sigma^2 = frac log beta_t + (1 - frac)
    # log posterior variance, frac = (v + 1) / 2; trained by L1 and L3, which with loss_weights.l0 > 0 see the mean
    # through a stop-gradient (ADM's hybrid loss; diffusion/losses.py loss_terms); the ancestral sampler uses it
    c.model.learn_sigma = False
    # > 0: ADM's class-conditional model (a baseline): the batch's integer "label" is embedded and added to the time
    # embedding; it is an input, not a modality (no forward-process shift, no head)
    c.model.num_classes = 0
    # False: the heads read the backbone's features through a stop-gradient, so their losses (L2) train the heads and
    # not the shared backbone, which learns from the denoising loss alone
    c.model.heads_train_backbone = True
    # with heads_train_backbone: the heads' losses reach the backbone only from examples with t <= this fraction of
    # diffusion.num_steps (1.0: from every t); above it the heads still train, on features they cannot change
    c.model.heads_train_backbone_max_t = 1.0
    # diffusion.read_known_classes: the standard deviation of the class vectors the known classes add to the time
    # embedding at initialisation; 1.0 is ADM's label embedding (PyTorch's nn.Embedding), as large as the time
    # embedding it joins; model.temb_dim ** -0.5 is flax's Embed init
    c.model.read_embedding_init_std = 1.0
    c.model.remat = False  # gradient checkpointing per U-Net ResBlock (memory for FLOPs; same numbers)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_steps = 1000  # T
    c.diffusion.beta_schedule = "linear"  # linear | cosine
    c.diffusion.prior_tol = 1e-2  # max KL(q(z_T|z_0,X) || N(0,I)) in nats/dim
    # weights of the ELBO terms (docs/math.md): l0 noise matching, l1 posterior KL, l2 modality recovery (heads),
    # l3 prior KL + reconstruction
    c.diffusion.loss_weights = ml_collections.ConfigDict({"l0": 1.0, "l1": 0.0, "l2": 1.0, "l3": 0.0})
    # what the backbone outputs: eps (ε̂ itself) | composite (the noise plus the auxiliary codes' share of z_t, whose
    # code part the heads' expected encodings then explain) | read_codes (label codes read out of z_t in closed form
    # and removed before the backbone, the read classes in its time embedding: objective.predict, code_reader.py)
    c.diffusion.denoiser_output = "eps"
    # read_codes only: a label's class, where it is known (the training data's; a given or drawn label in sampling),
    # is given to the reader instead of read from z_t: the backbone is then told the class exactly (an image denoiser
    # conditioned on its class) and the exact code is removed; unknown labels are still read
    c.diffusion.read_known_classes = False
    c.diffusion.bin_width = 0.125  # grid spacing of the image data (digits: 17 grey levels in [-1, 1])

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-3  # peak learning rate (AdamW)
    c.optim.warmup_steps = 200  # linear warmup from 0, then cosine decay
    c.optim.final_lr_fraction = 0.05  # cosine decay ends at lr * this
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.99  # Adam beta2
    c.optim.weight_decay = 0.0  # decoupled (AdamW)
    c.optim.grad_clip = 1.0  # global gradient-norm clip
    c.optim.ema_decay = 0.999  # EMA of the parameters; evaluation and sampling use the EMA

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 4000  # training steps (the cosine decay ends here)
    c.train.log_every = 100  # steps between metrics.jsonl / TensorBoard records
    c.train.checkpoint_every = 1000  # steps between checkpoints (and always at the end or on preemption)
    c.train.keep_checkpoints = 2  # checkpoints kept in workdir/checkpoints
    c.train.max_bad_steps = 10  # consecutive non-finite (skipped) steps that stop the run; checked at log steps

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel groups of devices (-1 = all devices / fsdp)
    c.mesh.fsdp = 1  # devices each parameter and optimizer moment is sharded over (1 = replicated)

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddpm"  # ddpm (ancestral) | ddim | dpm2m (DPM-Solver++(2M), ODE)
    c.sample.num_steps = 250  # respaced steps (<= diffusion.num_steps)
    c.sample.eta = 0.0  # DDIM noise
    c.sample.clip_z0 = False  # clip each step's predicted z_0 to [-1, 1] (helps short or few-step runs)
    # Classifier-free guidance weight per given auxiliary modality (models trained with modality dropout):
    # ε̃ = ε̂ + w (ε̂ - ε̂ without it), applied for training steps t in guidance_interval = (t_min, t_max).
    c.sample.guidance = ml_collections.ConfigDict()
    c.sample.guidance_interval = (0, 1000)  # (t_min, t_max)
    # Joint samples' labels: 'expected' (the article's sampler: the process carries each label head's expected code
    # at every step) or 'drawn' (each label drawn once from its head at t = T, the model's marginal of the label, and
    # the rest generated given it: ancestral sampling, label first; with a deterministic sampler the expected code
    # never commits to one class, and z_t then holds a mixture of codes no training example has)
    c.sample.joint_labels = "expected"
    # Labels neither given nor drawn when something else is given (image -> label, mask -> (image, label)): 'read'
    # (they stay in the process, read from z_t at every step) or 'absent' (a model trained with their dropout leaves
    # them out of the process, generates the rest without them, and reads them with their heads at the last step;
    # with diffusion.read_known_classes the backbone then sees no label rather than a soft read of one, which it was
    # never trained on)
    c.sample.unknown_labels = "read"
    # Masks that are not given, in every direction, joint samples included: 'read' (they stay in the process, carried
    # by their heads' expected codes at every step) or 'absent' (a model trained with their dropout leaves them out of
    # the process, generates the rest without them, and reads them with their heads at the last step: a joint sample
    # is then the image (and labels) generated without the mask, and a mask read from them)
    c.sample.unknown_masks = "read"
    c.sample.batch_size = 500  # samples per compiled sampler call
    c.sample.seed = 1  # sampling RNG (part of the --mode eval / sample output tag)

    c.eval = ml_collections.ConfigDict()
    c.eval.tag = ""  # non-empty: write eval_<tag>.json and samples/<tag>/ (compare samplers on one checkpoint)
    c.eval.num_samples = 1000  # jointly generated samples for the metrics
    c.eval.max_data_examples = 10000  # file sources: a seeded spread of at most this many examples per split
    c.eval.evaluator_steps = 2000  # training steps of the evaluator classifier
    c.eval.knn_k = 3  # k of improved precision/recall
    c.eval.image_to_label_draws = 1  # image -> label: independent reverse processes (mean accuracy; > 1: also the vote)
    c.eval.conditional_examples = 0  # image -> label / mask on the first N held-out examples (0: all of them)
    c.eval.elbo_examples = 256  # held-out examples whose ELBO (bits/dim per modality) is summed over all T steps
    c.eval.guidance_weights = (0.0, 1.0, 2.0, 4.0)  # label -> image accuracy per weight (models with dropout)
    # more (t_min, t_max) intervals to measure each nonzero weight under, besides sample.guidance_interval
    # (keys label/label_to_image_accuracy_guidance_<w>_t<t_min>-<t_max>)
    c.eval.guidance_intervals = ()
    c.eval.head_probe_steps = ()  # steps t in 1..T: label / mask head accuracy on held-out z_t, with and without it
    c.eval.inpainting_counts = ()  # inpaint held-out images with these numbers of squares (data.masking.square)
    # a joint masked-image model also keeps the known pixels at every reverse step (replacement), not only through
    # the masked image's shift
    c.eval.inpainting_replace_known = True
    return c


FILE_DATA_PRESETS = ("", "array_record", "smoke", "array_record_smoke")


def use_file_data(c: ml_collections.ConfigDict, preset: str) -> None:
    """The data, model and budget of the configs for data a user brings (mmdiff_jax/configs/folder_*.py): preset
    'array_record*' reads prepared shards instead of the folder; '*smoke' is a few CPU steps of a tiny model."""
    if preset not in FILE_DATA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {FILE_DATA_PRESETS}.")
    c.data.image_size = 32
    if preset.startswith("array_record"):
        c.data.source = "array_record"
        c.data.source_kwargs = ml_collections.ConfigDict({"path": ""})
        c.data.image_size = 0  # the shards' own size
    else:
        c.data.source = "folder"
        c.data.source_kwargs = ml_collections.ConfigDict({"root": ""})
    c.data.channels = 3
    c.data.flip = True
    c.data.global_batch_size = 64
    c.diffusion.bin_width = 2.0 / 255.0  # uint8 images
    c.model.width = 64
    c.model.blocks_per_level = 2
    c.model.temb_dim = 256
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 500
    c.optim.ema_decay = 0.9999
    c.train.num_steps = 50_000
    c.train.checkpoint_every = 2000
    c.eval.evaluator_steps = 2000
    if preset.endswith("smoke"):
        c.data.image_size = c.data.image_size and 16
        c.data.global_batch_size = 8
        c.model.width = 8
        c.model.blocks_per_level = 1
        c.model.temb_dim = 32
        c.diffusion.num_steps = 100
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 2
        c.optim.ema_decay = 0.9
        c.train.num_steps = 4
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.sample.num_steps = 5
        c.sample.batch_size = 16
        c.eval.num_samples = 16
        c.eval.evaluator_steps = 20
        c.eval.elbo_examples = 4
        c.eval.conditional_examples = 16  # = the sample batch: one compiled sampler for every metric


IMAGENET64_PRESETS = ("", "smoke")


def use_imagenet64_recipe(c: ml_collections.ConfigDict, preset: str) -> None:
    """The ImageNet-64 data, ADM backbone and ADM's recipe shared by mmdiff_jax/configs/imagenet64_*.py (their docstrings say
    what it is); '' the article's size, 'smoke' a few CPU steps at 16x16 (tests)."""
    if preset not in IMAGENET64_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {IMAGENET64_PRESETS}.")
    c.data.source = "array_record"
    c.data.source_kwargs = ml_collections.ConfigDict({"path": ""})
    c.data.image_size = 0
    c.data.flip = False
    c.data.global_batch_size = 2048
    c.data.workers = 2
    c.diffusion.num_steps = 1000
    c.diffusion.beta_schedule = "cosine"
    c.diffusion.bin_width = 2.0 / 255.0
    c.model.backbone = "adm"
    c.model.channels = (192, 384, 576, 768)
    c.model.blocks_per_level = 3
    c.model.attention_resolutions = (32, 16, 8)
    c.model.num_head_channels = 64
    c.model.groups = 32
    c.model.temb_dim = 768
    c.model.scale_shift_norm = True
    c.model.resblock_updown = True
    c.model.dropout = 0.1
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 0
    c.optim.final_lr_fraction = 1.0  # constant
    c.optim.b2 = 0.999
    c.optim.ema_decay = 0.9999
    c.train.num_steps = 540_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.sample.batch_size = 256
    c.eval.num_samples = 10_000
    c.eval.evaluator_steps = 5000
    c.eval.conditional_examples = 2000
    if preset == "smoke":
        c.latent_shape = (16, 16, 3)
        c.modalities.image = dict(kind="image", shape=(16, 16, 3))
        c.data.global_batch_size = 8
        c.data.workers = 0
        c.diffusion.num_steps = 100
        c.sample.num_steps = 10
        c.sample.batch_size = 16
        c.eval.num_samples = 16
        c.eval.conditional_examples = 8
        c.eval.evaluator_steps = 20
        c.model.channels = (16, 32)
        c.model.blocks_per_level = 1
        c.model.attention_resolutions = (8,)
        c.model.num_head_channels = 8
        c.model.groups = 8
        c.model.temb_dim = 64
        c.model.dtype = "float32"
        c.optim.lr = 1e-3
        c.train.num_steps = 3
        c.train.log_every = 1
        c.train.checkpoint_every = 3


def give_known_labels_to_the_denoiser(c: ml_collections.ConfigDict, label: str = "label") -> None:
    """The labels' classes go to the denoiser wherever they are known (the data's in training, given or drawn labels
    in sampling) and their codes are read out of z_t elsewhere (docs/math.md, "Reading the label codes"); the head of
    label modality `label` reads the noisy latent (the backbone's features carry the given class); joint samples draw
    the labels first."""
    c.diffusion.denoiser_output = "read_codes"
    c.diffusion.read_known_classes = True
    c.modalities[label].head = "latent"
    c.sample.joint_labels = "drawn"
