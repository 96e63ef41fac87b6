"""python -m jfacerec.evaluation.orl: closed and open set on AT&T/ORL beside an eigenfaces baseline."""

import json
import os

import pytest

from conftest import DATA, load_config, needs_orl

pytestmark = pytest.mark.slow


def nearest_template(enrolled, labels, probes):
    """(cosine [q], subject [q]) of each probe's nearest mean of the enrolled rows [n, dim] with
    int labels [n], computed by hand."""
    import numpy as np

    sums = np.zeros((labels.max() + 1, enrolled.shape[1]))
    np.add.at(sums, labels, enrolled)
    similarity = probes @ (sums / np.linalg.norm(sums, axis=1, keepdims=True)).T
    return similarity.max(axis=1), similarity.argmax(axis=1)

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


@needs_orl
def test_the_open_set_is_matched_after_wccn_fitted_on_the_enrolled_faces(tmp_path):
    import copy

    import numpy as np

    from jfacerec.data import sources
    from jfacerec.evaluation import orl
    from jfacerec.inference import wccn
    from jfacerec.inference.recognizer import load

    config = load_config("orl.py:runlocal")
    config.update(total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.root = os.path.join(DATA, "att_faces")
    config.eval.wccn = 0.2
    scores, best, truth = orl.open_set_split(config, str(tmp_path / "w"), 0)["cnn"]
    split = copy.deepcopy(config)
    split.dataset.known_identities = config.dataset.open_set_known
    data = sources.get_dataset(split)
    model = load(str(tmp_path / "w" / "open_00"))
    known = model.embed_files(list(data.train.files.paths))
    queries = model.embed_files(list(data.test.files.paths) + list(data.unseen.files.paths))

    whitening = wccn.fit(known, data.train.files.labels, 0.2)
    expected, expected_best = nearest_template(wccn.apply(whitening, known),
                                               data.train.files.labels,
                                               wccn.apply(whitening, queries))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_array_equal(best, expected_best)
    assert np.sum(truth == -1) == len(data.unseen)
    plain, _ = nearest_template(known, data.train.files.labels, queries)
    assert np.abs(scores - plain).max() > 1e-2


@needs_orl
def test_closed_set_on_held_out_training_images_answers_by_head_and_by_templates(tmp_path):
    import copy

    import numpy as np

    from jfacerec.data import sources
    from jfacerec.evaluation import orl
    from jfacerec.inference.recognizer import load

    config = load_config("orl.py:runlocal")
    config.update(total_steps=4, checkpoint_every_steps=4, num_devices=1)
    config.dataset.update(root=os.path.join(DATA, "att_faces"), validation_images=1)
    results = orl.run(config, str(tmp_path / "w"), splits=1, open_set=False)
    assert results["validation_images"] == 1 and "open_set_threshold" not in results
    assert "open_set_mean" not in results["cnn"]
    split = copy.deepcopy(config)
    split.dataset.known_identities = 40
    data = sources.get_dataset(split)
    assert len(data.test) == 40  # one held-out training image per subject
    model = load(str(tmp_path / "w" / "closed_00"))
    known = model.embed_files(list(data.train.files.paths))
    tests = model.embed_files(list(data.test.files.paths))
    _, nearest = nearest_template(known, data.train.files.labels, tests)
    expected = np.mean(np.array(data.train.files.names)[nearest]
                       == np.array(data.test.files.names)[data.test.labels()])
    assert results["cnn_templates"]["closed_set_accuracy"] == [expected]
    heads = model.classify_files(list(data.test.files.paths))
    assert results["cnn"]["closed_set_accuracy"] == [
        np.mean(np.array(heads) == np.array(data.test.files.names)[data.test.labels()])]
