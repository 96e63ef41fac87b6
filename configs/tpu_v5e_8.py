"""Full-scale training on a TPU v5e-8 (8 chips, one host): the recipe of configs/tpu_v4_32.py
(iresnet50 at 112, bfloat16, ArcFace, PartialFC 0.3) at batch 512 on a WebFace4M-like dataset,
the class weights split over 2 chips (205,990 identities = 2 x 102,995).

launch/tpu_vm.sh all --name r50 --zone us-west4-a --accelerator-type v5litepod-8 \
    --config configs/tpu_v5e_8.py --workdir gs://YOUR_BUCKET/workdirs/tpu_v5e_8 \
    --config.dataset.root=/data/webface4m
"runlocal" shrinks it to synthetic faces on the CPU.
"""

import os

import ml_collections

from jfacerec.core import config_base

tpu_v4_32 = config_base.sibling(__file__, "tpu_v4_32")

# Identities of the placeholder dataset (the data itself decides; shape checks use this).
NUM_IDENTITIES = 205_990


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return tpu_v4_32.tpu_config(batch_size=512, model_devices=2, images=4_235_242,
                                root=os.environ.get("JFACEREC_WEBFACE4M", "/data/webface4m"),
                                arg=arg, path=__file__)
