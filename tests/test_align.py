"""Five-point alignment: the similarity estimator, the warp, its errors, and alignment in the folder
source, the recognizer and the gallery command."""

import os

import chex
import numpy as np
import pytest
from PIL import Image

import jfacerec
from conftest import read_csv, run_module, tiny_config
from jfacerec.data import align as align_lib
from jfacerec.data.images import decode
from jfacerec.data.sources import get_dataset
from jfacerec.data.synthetic import render_faces


def _similarity(angle_degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """[2, 3]: rotate by angle, scale, then shift."""
    c, s = np.cos(np.radians(angle_degrees)), np.sin(np.radians(angle_degrees))
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _posed(face: np.ndarray, matrix: np.ndarray, canvas: int):
    """(the face moved by matrix onto a canvas x canvas picture, where its template points went)."""
    points = _apply(matrix, align_lib.template(face.shape[0]))
    return align_lib.warp(face, matrix, canvas), points


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def test_the_estimator_recovers_an_exact_similarity():
    truth = _similarity(23.0, 1.7, (12.5, -4.0))
    src = align_lib.ARCFACE_TEMPLATE
    estimate = align_lib.similarity_transform(src, _apply(truth, src))
    chex.assert_shape(estimate, (2, 3))
    np.testing.assert_allclose(estimate, truth, atol=1e-9)


def test_the_estimator_is_the_least_squares_similarity_for_noisy_points():
    # x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty): lstsq is the closed
    # form the SVD solution must equal.
    rng = np.random.default_rng(0)
    src = align_lib.ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2))
    dst = _apply(_similarity(-40.0, 0.6, (3.0, 9.0)), src) + rng.normal(0, 2, (5, 2))
    x, y = src[:, 0], src[:, 1]
    design = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1),
                             np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
    a, b, tx, ty = np.linalg.lstsq(design, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)[0]
    np.testing.assert_allclose(align_lib.similarity_transform(src, dst),
                               [[a, -b, tx], [b, a, ty]], atol=1e-6)


def test_align_undoes_a_known_similarity_above_40_db():
    face = render_faces(np.array([3]), np.array([0]), image_size=112)[0]
    posed, points = _posed(face, _similarity(17.0, 1.4, (60.0, 20.0)), 240)
    aligned = jfacerec.align(posed, points)
    chex.assert_shape(aligned, (112, 112, 3))
    assert aligned.dtype == np.uint8
    # Two bilinear resamplings blur edges a little: the interior is compared.
    assert _psnr(aligned[8:-8, 8:-8], face[8:-8, 8:-8]) > 40.0  # 47.5 dB measured
    # Not aligning (the posed picture's own crop) is far worse.
    assert _psnr(np.asarray(Image.fromarray(posed).resize((112, 112)))[8:-8, 8:-8],
                 face[8:-8, 8:-8]) < 15.0


def test_align_scales_the_template_and_takes_grey_and_pil_images():
    face = render_faces(np.array([1]), np.array([2]), image_size=64)[0]
    posed, points = _posed(face, _similarity(-10.0, 1.2, (20.0, 10.0)), 128)
    from_pil = jfacerec.align(Image.fromarray(posed), points, size=64)
    np.testing.assert_array_equal(from_pil, jfacerec.align(posed, points, size=64))
    grey = jfacerec.align(posed.mean(-1).astype(np.uint8), points, size=32)
    chex.assert_shape(grey, (32, 32, 3))
    assert _psnr(from_pil[4:-4, 4:-4], face[4:-4, 4:-4]) > 25.0
    # Pixel-index coordinates: a template-placed face at its own size is left as it is (but for
    # rounding: the estimate is the identity to 1e-15, and Pillow rounds a hair off integers).
    np.testing.assert_allclose(jfacerec.align(face, align_lib.template(64), size=64), face, atol=1)


@pytest.mark.parametrize("landmarks, message", [
    (np.full((5, 2), 30.0), "all the same point"),
    (np.stack([np.linspace(10, 50, 5), np.linspace(20, 40, 5)], 1), "on one line"),
    (np.where(np.eye(5, 2, dtype=bool), np.nan, align_lib.ARCFACE_TEMPLATE), "NaN or infinite"),
    (np.where(np.eye(5, 2, dtype=bool), np.inf, align_lib.ARCFACE_TEMPLATE), "NaN or infinite"),
    (align_lib.ARCFACE_TEMPLATE[:4], r"\[5, 2\]"),
    (align_lib.ARCFACE_TEMPLATE.reshape(-1), r"\[5, 2\]"),
    ([["a", "b"]] * 5, "numbers"),
    (align_lib.ARCFACE_TEMPLATE + [70.0, 0.0], "outside the 112x112 image"),
])
def test_degenerate_landmarks_are_refused(landmarks, message):
    image = np.zeros((112, 112, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        jfacerec.align(image, landmarks)


def _posed_tree(root, identities=3, per_identity=3):
    """root/person_i/j.png: synthetic 32-pixel faces posed by random similarities on 48-pixel
    pictures, and the CSV rows `path,x1,...,y5` of their landmarks (relative paths)."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(identities):
        os.makedirs(root / f"person_{i}", exist_ok=True)
        faces = render_faces(np.full(per_identity, i), np.arange(per_identity), image_size=32)
        for j, face in enumerate(faces):
            matrix = _similarity(rng.uniform(-25, 25), rng.uniform(0.8, 1.1), rng.uniform(2, 12, 2))
            posed, points = _posed(face, matrix, 48)
            Image.fromarray(posed).save(root / f"person_{i}" / f"{j}.png")
            rows.append([f"person_{i}/{j}.png", *points.reshape(-1).round(4)])
    return rows


def _write_csv(path, rows, header=True):
    lines = (["path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5"] if header else []) + [
        ",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_folder_dataset_with_landmarks_yields_aligned_faces(tmp_path):
    rows = _posed_tree(tmp_path / "tree")
    config = tiny_config()
    config.dataset.update(name="folder", root=str(tmp_path / "tree"), test_images=1,
                          landmarks=_write_csv(tmp_path / "lm.csv", rows))
    dataset = get_dataset(config)
    assert len(dataset.train) == 6 and len(dataset.test) == 3
    record = dataset.train[0]
    path = dataset.train.files.paths[0]
    row = next(r for r in rows if path.endswith(r[0]))
    expected = jfacerec.align(decode(path), np.reshape(row[1:], (5, 2)), size=16)
    chex.assert_shape(record["image"], (16, 16, 3))
    np.testing.assert_array_equal(record["image"], expected)


def test_folder_landmark_errors_name_the_csv_line_and_the_image(tmp_path):
    rows = _posed_tree(tmp_path / "tree", identities=2, per_identity=2)
    config = tiny_config()
    config.dataset.update(name="folder", root=str(tmp_path / "tree"), test_images=0)

    config.dataset.landmarks = _write_csv(tmp_path / "short.csv", rows[:-1])
    with pytest.raises(ValueError, match=r"person_1/1\.png: no landmarks in .*short\.csv"):
        get_dataset(config)
    bad = [list(r) for r in rows]
    bad[2][3] = "nose"
    config.dataset.landmarks = _write_csv(tmp_path / "bad.csv", bad)
    with pytest.raises(ValueError, match=r"bad\.csv line 4: .*could not convert"):
        get_dataset(config)
    flat = [list(r) for r in rows]
    flat[1][1:] = [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]
    config.dataset.landmarks = _write_csv(tmp_path / "flat.csv", flat, header=False)
    with pytest.raises(ValueError, match=r"flat\.csv line 2: the five landmarks lie on one line"):
        get_dataset(config)
    outside = [list(r) for r in rows]
    outside[0][1] = 400.0
    config.dataset.landmarks = _write_csv(tmp_path / "outside.csv", outside)
    source = get_dataset(config).train
    with pytest.raises(ValueError, match=r"0\.png \(landmarks of .*outside\.csv line 2\): .*"
                                         r"outside the 48x48 image"):
        source[0]
    config.dataset.update(landmarks=str(tmp_path / "none.csv"))
    with pytest.raises(FileNotFoundError, match="none.csv: no such landmarks file"):
        get_dataset(config)


@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory):
    """(workdir, tree root, landmarks CSV): a few steps on synthetic faces, and a posed tree."""
    from jfacerec.training import train

    tmp = tmp_path_factory.mktemp("align")
    config = tiny_config(total_steps=4, checkpoint_every_steps=4)
    workdir = str(tmp / "workdir")
    train(config, workdir)
    rows = _posed_tree(tmp / "tree")
    return workdir, tmp / "tree", _write_csv(tmp / "lm.csv", rows), rows


def test_embed_with_landmarks_equals_embed_of_the_aligned_faces(aligned_model):
    workdir, root, _, rows = aligned_model
    model = jfacerec.load(workdir)
    paths = [str(root / r[0]) for r in rows[:4]]
    landmarks = np.array([np.reshape(r[1:], (5, 2)) for r in rows[:4]], np.float64)
    aligned = np.stack([jfacerec.align(decode(p), lm, model.image_size)
                        for p, lm in zip(paths, landmarks)])
    expected = model.embed(aligned)
    np.testing.assert_allclose(model.embed(paths, landmarks=landmarks), expected, atol=1e-5)
    pictures = [decode(p) for p in paths]
    np.testing.assert_allclose(model.embed(pictures, landmarks=landmarks), expected, atol=1e-5)
    np.testing.assert_allclose(model.embed(pictures[0], landmarks=landmarks[0]), expected[:1],
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"landmarks for 4 images must be \[4, 5, 2\]"):
        model.embed(paths, landmarks=landmarks[:3])


def test_the_gallery_command_aligns_with_landmarks(aligned_model, tmp_path):
    from jfacerec.data.folders import scan_identity_folders
    from jfacerec.inference.gallery import Gallery, enroll

    workdir, root, csv_path, rows = aligned_model
    gallery = str(tmp_path / "g.npz")
    result = run_module("jfacerec.gallery", "enroll", "--workdir", workdir, "--images", str(root),
                        "--out", gallery, "--landmarks", csv_path, "--threshold", "-1")
    assert result.returncode == 0, result.stderr
    model = jfacerec.load(workdir)
    files = scan_identity_folders(os.path.abspath(root))
    landmarks = np.array([np.reshape(r[1:], (5, 2)) for r in rows], np.float64)
    expected = enroll(model, files, landmarks=landmarks)
    np.testing.assert_allclose(Gallery.load(gallery).embeddings, expected.embeddings, atol=1e-5)

    out = str(tmp_path / "matches.csv")
    result = run_module("jfacerec.gallery", "identify", "--gallery", gallery, "--images",
                        str(root), "--out", out, "--landmarks", csv_path)
    assert result.returncode == 0, result.stderr
    matches = model.identify(list(files.paths), Gallery.load(gallery), landmarks=landmarks)
    assert [r[1] for r in read_csv(out)[1:]] == [m.name for m in matches]
