"""python -m jfacerec.evaluation.orl: closed and open set on AT&T/ORL beside an eigenfaces baseline."""

import json
import os

import pytest

from conftest import DATA, load_config, needs_orl

pytestmark = pytest.mark.slow

@needs_orl
def test_orl_protocol_reports_cnn_and_eigenfaces(tmp_path):
    from jfacerec.evaluation import orl

    config = load_config("orl.py:runlocal")
    config.update(total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.root = os.path.join(DATA, "att_faces")
    results = orl.run(config, str(tmp_path / "w"), splits=2)
    eigen = results["eigenfaces"]
    assert len(eigen["closed_set_accuracy"]) == 2
    # Eigenfaces on 16-pixel ORL faces, 5 training images per subject: well above chance (2.5%).
    assert eigen["closed_set_mean"] > 0.8
    assert 0.25 <= eigen["open_set_mean"] <= 1.0
    assert 0.0 <= results["cnn"]["closed_set_mean"] <= 1.0
    assert results["open_set_threshold"] == "chosen on the other splits"
    assert json.loads((tmp_path / "w" / "orl_results.json").read_text()) == results
