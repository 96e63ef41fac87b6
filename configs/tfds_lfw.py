"""LFW through TensorFlow Datasets (`tfds:lfw`): configs/lfw.py's model and schedule, read with
`tfds.data_source` instead of from the image folders.

Prepare it once (downloads about 170 MB; TFDS's lfw builder needs TensorFlow for this step only):
  pip install 'jfacerec[tfds]' tensorflow-cpu
  python -c "import tensorflow_datasets as tfds; \
tfds.builder('lfw', file_format='array_record').download_and_prepare()"
then
  python -m jfacerec.train --config configs/tfds_lfw.py --workdir workdirs/tfds_lfw
  python -m jfacerec.evaluate --config configs/tfds_lfw.py --workdir workdirs/tfds_lfw

TFDS's lfw is one split of 13,233 images, labelled with people's names and without the pairs
files: every identity trains, one image of each person with two or more is held out for
closed-set classification, and there is no unseen split (use configs/lfw.py and
jfacerec.evaluation.lfw for the pairs protocol). "runlocal" shrinks it to a smoke test.
"""

import ml_collections

from jfacerec.core import config_base

lfw = config_base.sibling(__file__, "lfw")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_base.parse_arg(arg, __file__)
    c = lfw.get_config("runlocal" if "runlocal" in variant else None)
    c.dataset = config_base.dataset(
        name="tfds", tfds_name="lfw",
        # empty: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets
        data_dir="",
        tfds_split="train", tfds_unseen_split="",
        image_key="image", label_key="label",  # label: the person's name (text)
        test_images=1,
        # 250x250 images, the face in about the central half (as in configs/lfw.py)
        crop_fraction=0.5, cache=True)
    return c
