"""Full-scale training on a TPU v4-32 slice (16 chips, 4 hosts): iresnet50 at 112 pixels, bfloat16
compute, ArcFace over 360k identities with the class weights split over 8 chips and PartialFC 0.3.

launch/tpu_vm.sh all --name r50 --zone us-central2-b --accelerator-type v4-32 \
    --config configs/tpu_v4_32.py --workdir gs://YOUR_BUCKET/workdirs/tpu_v4_32 \
    --config.dataset.root=gs://YOUR_BUCKET/glint360k
The dataset is ArrayRecord shards from `python -m jfacerec.data.pack` (a Glint360K-like tree of
identity folders; `mesh.model` must divide its identity count: 360,232 = 8 x 45,029).
"runlocal" shrinks it to synthetic faces on the CPU, the same code paths (PartialFC included).
"""

import os

import ml_collections

from jfacerec.core import config_base

zoo = config_base.sibling(__file__, "zoo")

# Identities of the placeholder dataset (the data itself decides; shape checks use this).
NUM_IDENTITIES = 360_232


def tpu_config(*, batch_size: int, model_devices: int, root: str, images: int,
               arg: str | None, path: str) -> ml_collections.ConfigDict:
    """The big_vision-style recipe: iresnet50, bf16, ArcFace, model-split head, PartialFC 0.3;
    arg (of the config file `path`): "runlocal"."""
    variant = config_base.parse_arg(arg, path)
    c = zoo.get_config("iresnet50")
    c.dtype = "bfloat16"  # parameters and optimizer state stay float32; the loss is float32
    c.image_size = 112
    c.batch_size = batch_size
    c.total_steps = 20 * images // batch_size  # 20 epochs
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 3
    c.mesh.model = model_devices
    c.model.update(name="iresnet50", embedding_dim=512, norm="batch", dropout=0.0)
    c.loss.update(name="arcface", label_smoothing=0.0, sample_rate=0.3)
    c.loss.arcface.update(scale=64.0, margin=0.5)
    c.optimizer.update(name="sgd", learning_rate=0.1 * batch_size / 512, momentum=0.9,
                       weight_decay=5e-4, warmup_steps=2 * images // batch_size,
                       schedule="cosine")
    c.dataset = config_base.dataset(name="arrayrecord", root=root, test_images=0)
    c.input.update(num_workers=16, worker_threads=16)  # 16 reading threads in each worker
    c.eval.update(batch_size=1024)
    if "runlocal" in variant:
        c.image_size = 32
        c.batch_size = 32
        c.total_steps = 20
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.mesh.model = 1  # any CPU has one device
        c.model.update(width_multiplier=0.25, embedding_dim=64)
        c.optimizer.update(learning_rate=0.1, warmup_steps=5)
        c.dataset = config_base.dataset(
            name="synthetic", seed=0, num_identities=64, train_images=8, test_images=2,
            num_unseen_identities=20, unseen_images=4)
        c.input.update(num_workers=0, num_threads=2)
        c.eval.update(batch_size=64, num_pairs=200)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return tpu_config(batch_size=1024, model_devices=8, images=17_091_657,
                      root=os.environ.get("JFACEREC_GLINT360K", "gs://YOUR_BUCKET/glint360k"),
                      arg=arg, path=__file__)
