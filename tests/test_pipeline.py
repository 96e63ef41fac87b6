import chex
import grain
import numpy as np
import pytest

from jfacerec.data.pipeline import (ERASE_AREA, Augment, eval_batches, random_crop_flip,
                                    random_erase, random_rotate, train_dataset)
from jfacerec.data.records import SyntheticSource


@pytest.fixture(scope="module")
def source():
    return SyntheticSource(np.arange(6), 5, image_size=20)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_have_shapes_dtypes_and_range(source):
    batch = next(iter(train_dataset(source, batch_size=8, image_size=16, seed=0)))
    chex.assert_shape(batch["image"], (8, 16, 16, 3))
    chex.assert_type([batch["image"], batch["label"]], [np.float32, np.int32])
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["label"]) <= set(range(6))


def test_same_seed_same_stream_other_seed_other_stream(source):
    a = take(iter(train_dataset(source, batch_size=8, image_size=16, seed=3)), 5)
    b = take(iter(train_dataset(source, batch_size=8, image_size=16, seed=3)), 5)
    c = take(iter(train_dataset(source, batch_size=8, image_size=16, seed=4)), 5)
    chex.assert_trees_all_equal(a, b)
    assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def test_every_record_is_seen_once_per_epoch(source):
    batches = take(iter(train_dataset(source, batch_size=10, image_size=16, seed=0)), 3)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels), [5] * 6)


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_resumes_exactly_from_its_state(source, workers):
    ds = train_dataset(source, batch_size=8, image_size=16, seed=1, num_workers=workers)
    it = iter(ds)
    take(it, 7)  # crosses an epoch boundary (30 records)
    state = it.get_state()
    expected = take(it, 4)
    resumed = iter(ds)
    resumed.set_state(state)
    chex.assert_trees_all_equal(take(resumed, 4), expected)
    for i in (it, resumed):
        i.close() if hasattr(i, "close") else None


def test_worker_processes_and_their_threads_give_the_same_batches(source):
    """The stream depends on the seed alone, not on how it is read (grain workers, threads)."""
    expected = take(iter(train_dataset(source, batch_size=8, image_size=16, seed=2)), 3)
    it = iter(train_dataset(source, batch_size=8, image_size=16, seed=2, num_workers=1,
                            worker_threads=2))
    chex.assert_trees_all_equal(take(it, 3), expected)
    it.close() if hasattr(it, "close") else None


class IndexSource:
    """Record i is a constant image of value i labelled i, so batches reveal which records came."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"image": np.full((8, 8, 3), i, np.uint8), "label": np.int32(i)}


def test_processes_read_disjoint_halves():
    halves = [train_dataset(IndexSource(), batch_size=10, image_size=8, seed=0, process_index=p,
                            process_count=2) for p in (0, 1)]
    seen = []
    for half in halves:
        batches = take(iter(half), 2)  # 2 x 5 = one epoch of a half
        assert batches[0]["label"].shape == (5,)
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_allclose(np.concatenate([b["image"][:, 0, 0, 0] for b in batches]),
                                   labels * 2.0 / 255.0 - 1.0, atol=1e-6)
        assert len(set(labels)) == 10
        seen.append(set(labels))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(20))


def test_crop_flip_is_a_resized_crop():
    image = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    out = random_crop_flip(image, np.random.default_rng(0), 16, Augment(flip=False, min_scale=1.0,
                                                                        max_aspect_change=0.0))
    chex.assert_shape(out, (16, 16, 3))
    flipped = random_crop_flip(image, np.random.default_rng(0), 20,
                               Augment(flip=True, min_scale=1.0, max_aspect_change=0.0))
    assert np.array_equal(flipped, image) or np.array_equal(flipped, image[:, ::-1])



def test_random_erasing_hides_one_rectangle_of_the_drawn_size_as_often_as_asked():
    """erase 0.5: about half the images get one rectangle of noise covering ERASE_AREA of the
    image, the rest of each image untouched; erase 0 returns the image without drawing."""
    image = np.full((40, 40, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    assert random_erase(image, rng, 0.0) is image
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
    changed = np.stack([(random_erase(image, rng, 0.5) != 128).any(-1) for _ in range(400)])
    erased = changed.any((1, 2))
    assert 0.42 < erased.mean() < 0.58
    for mask in changed[erased]:
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        # noise equal to 128 in all three channels is left out of the mask: about 1 in 16M
        assert mask.sum() == box
        assert ERASE_AREA[0] * 0.5 <= box / mask.size <= ERASE_AREA[1] * 1.3
    out = random_crop_flip(image, np.random.default_rng(1), 40, Augment(flip=False, erase=1.0))
    assert (out != 128).any() and image.max() == 128

def test_random_rotation_turns_the_face_by_the_drawn_angle_and_fills_corners_with_its_mean():
    """A horizontal line through the centre comes out at the drawn angle (counter-clockwise, PIL's
    sense), within the drawn range; the uncovered corners hold the image's mean colour, never
    black; rotate 0 returns the image without drawing."""
    image = np.full((41, 41, 3), 60, np.uint8)
    image[20, 4:37] = 250
    rng = np.random.default_rng(0)
    assert random_rotate(image, rng, 0.0) is image
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
    mean = np.round(image.reshape(-1, 3).mean(0))
    angles = []
    for seed in range(6):
        out = random_rotate(image, np.random.default_rng(seed), 30.0)
        drawn = np.random.default_rng(seed).uniform(-30.0, 30.0)
        chex.assert_shape(out, image.shape)
        chex.assert_type(out, np.uint8)
        rows, cols = np.nonzero(out[..., 0] > 155)
        slope = np.polyfit(cols - 20.0, 20.0 - rows, 1)[0]
        np.testing.assert_allclose(np.degrees(np.arctan(slope)), drawn, atol=2.0)
        if abs(drawn) > 5.0:
            corners = out[[0, 0, -1, -1], [0, -1, 0, -1]]
            np.testing.assert_allclose(corners, np.broadcast_to(mean, corners.shape), atol=1)
        angles.append(drawn)
    assert min(angles) < 0 < max(angles) and max(map(abs, angles)) <= 30.0
    turned = random_crop_flip(image, np.random.default_rng(3), 41,
                              Augment(flip=False, min_scale=1.0, max_aspect_change=0.0,
                                      rotate=30.0))
    np.testing.assert_array_equal(turned, random_rotate(image, np.random.default_rng(3), 30.0))


def test_eval_batches_cover_everything_in_order(source):
    batches = list(eval_batches(source, batch_size=7, image_size=20))
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, source.labels())
    assert [len(b["label"]) for b in batches] == [7, 7, 7, 7, 2]
    np.testing.assert_allclose(batches[0]["image"][0], source[0]["image"] / 127.5 - 1.0,
                               atol=1e-6)


def test_empty_source_is_refused():
    class Empty:
        def __len__(self):
            return 0

        def __getitem__(self, i):
            raise IndexError(i)

    with pytest.raises(ValueError, match="empty"):
        train_dataset(Empty(), batch_size=4, image_size=16, seed=0)


def test_grain_is_the_engine(source):
    assert isinstance(train_dataset(source, batch_size=4, image_size=16, seed=0),
                      grain.IterDataset)
