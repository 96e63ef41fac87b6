"""A workdir written by jfacerec 0.1 (before the packages were split by role and models/layers.py
was split by job) still loads and embeds exactly as it did.

tests/fixtures/workdir_v0_1 was made by commit 0ee4166 with
`python -m jfacerec.train --config configs/demo.py:runlocal --config.image_size=16
--config.keep_checkpoints=1`; embeddings.json holds that version's `jfacerec.load(W).embed` of four
synthetic faces.
"""

import json
import os
import shutil

import numpy as np

import jfacerec
from jfacerec.data.synthetic import render_faces

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "workdir_v0_1")


def test_a_checkpoint_written_before_the_split_loads_and_embeds_the_same(tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(FIXTURE, workdir)  # the fixture stays read-only: loading may add files
    with open(workdir / "embeddings.json") as f:
        expected = json.load(f)
    model = jfacerec.load(str(workdir))
    assert model.step == 20
    faces = render_faces(expected["identities"], expected["images"],
                         image_size=expected["image_size"], seed=expected["seed"])
    np.testing.assert_allclose(model.embed(faces), np.array(expected["embeddings"], np.float32),
                               rtol=1e-5, atol=1e-6)
