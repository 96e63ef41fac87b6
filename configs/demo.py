"""The demo: a small ResNet trained from scratch on synthetic identities, CPU minutes.

python -m jfacerec.train --config configs/demo.py --workdir /tmp/demo
python -m jfacerec.evaluate --config configs/demo.py --workdir /tmp/demo
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, over all devices and processes
    c.total_steps = 1100
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.image_size = 32
    c.dtype = "float32"
    c.num_devices = 0  # 0: every device
    # Devices that split the class weights by columns (a distributed softmax, for very many
    # identities); the rest of the mesh is data parallel. 1: plain data parallelism.
    c.mesh = ml_collections.ConfigDict(dict(model=1))

    c.model = ml_collections.ConfigDict(dict(
        name="resnet_tiny", embedding_dim=128, norm="group", norm_groups=8, width_multiplier=1.0,
        dropout=0.0, dropblock=0.0))
    # loss.name is one loss or a weighted sum ("0.7*softmax + 0.3*triplet"); each loss's options
    # sit under its own name.
    c.loss = ml_collections.ConfigDict(dict(
        name="softmax", label_smoothing=0.1,
        # PartialFC: the fraction of classes in each step's softmax (all positives + random
        # negatives); 1.0 uses every class.
        sample_rate=1.0,
        arcface=dict(scale=32.0, margin=0.5),
        cosface=dict(scale=32.0, margin=0.35),
        sphereface=dict(margin=4, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0,
                        lambda_min=5.0),
        combined=dict(scale=32.0, m1=1.0, m2=0.3, m3=0.2),
        triplet=dict(margin=0.2, mining="batch_all"),
        center=dict(update="rule", alpha=0.5, learning_rate=0.5)))
    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, b1=0.9, b2=0.999,
        weight_decay=5e-4, warmup_steps=100, schedule="cosine", grad_clip_norm=0.0))
    c.dataset = ml_collections.ConfigDict(dict(
        name="synthetic", seed=0, num_identities=100, train_images=64, test_images=6,
        num_unseen_identities=200, unseen_images=10))
    # num_threads=0 reads in the training loop's thread, which async dispatch already overlaps
    # with the step: reading threads only contend with it for the GIL (benchmarks/README.md,
    # "Synthetic input pipeline").
    c.input = ml_collections.ConfigDict(dict(
        num_workers=0, num_threads=0, worker_threads=0, sampler="random", pk_images=4,
        augment=dict(flip=True, min_scale=0.8, max_aspect_change=0.1)))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=256, flip=True, num_pairs=3000, folds=10))

    if arg == "runlocal":  # seconds, for a smoke test
        c.total_steps = 20
        c.log_every_steps = 5
        c.checkpoint_every_steps = 10
        c.batch_size = 32
        c.model.width_multiplier = 0.25
        c.dataset.update(num_identities=16, train_images=8, test_images=2,
                         num_unseen_identities=20, unseen_images=4)
    return c
