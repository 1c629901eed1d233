"""tfds sources: the offline digits builder, mnist/cifar10 through tfds mock data, the batch iterator."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmjax.data.tfds_sources import batches, data_source, to_model_space


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_digits_are_prepared_offline_with_a_fixed_split(digits_dir):
    train = data_source("digits", split="train", data_dir=digits_dir)
    test = data_source("digits", split="test", data_dir=digits_dir)
    assert (len(train), len(test)) == (1437, 360)
    record = train[0]
    assert record["image"].shape == (8, 8, 1) and record["image"].dtype == np.uint8
    images = np.stack([train[i]["image"] for i in range(len(train))])
    assert images.max() == 255 and images.min() == 0
    from sklearn.datasets import load_digits

    # every image is one of scikit-learn's, rescaled 16 -> 255
    reference = {np.round(im * 255 / 16).astype(np.uint8).tobytes() for im in load_digits().images}
    assert all(im[..., 0].tobytes() in reference for im in images[:50])
    train_set = {train[i]["image"].tobytes() + bytes([train[i]["label"]]) for i in range(len(train))}
    assert (
        sum(test[i]["image"].tobytes() + bytes([test[i]["label"]]) in train_set for i in range(len(test))) < 5
    )


def test_batches_are_deterministic_shuffled_and_sharded(digits_dir):
    source = data_source("digits", split="train", data_dir=digits_dir)
    first = [b[1] for b in itertools.islice(batches(source, batch_size=100, seed=3), 3)]
    again = [b[1] for b in itertools.islice(batches(source, batch_size=100, seed=3), 3)]
    other = [b[1] for b in itertools.islice(batches(source, batch_size=100, seed=4), 3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    # two processes: disjoint shares of each epoch; together they cover it
    shares = []
    for rank in range(2):
        it = batches(source, batch_size=10, seed=5, process_index=rank, process_count=2)
        epoch_batches = [b for b in itertools.islice(it, 71) if b[0] == 0]
        shares.append({im.tobytes() for _, ims, _ in epoch_batches for im in ims})
    assert len(shares[0]) > 600 and len(shares[1]) > 600
    assert len(shares[0] & shares[1]) < 20  # only duplicate images in the data can coincide
    # epochs differ in order, and a resumed iterator can start at any epoch
    epoch1 = next(b for b in batches(source, batch_size=100, seed=3) if b[0] == 1)
    resumed = next(batches(source, batch_size=100, seed=3, start_epoch=1))
    assert np.array_equal(epoch1[1], resumed[1]) and not np.array_equal(epoch1[1], first[0])


def test_to_model_space():
    np.testing.assert_allclose(to_model_space(np.array([0, 255], np.uint8)), [-1.0, 1.0])


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_online_datasets_through_tfds_mock_data(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        source = data_source(name, split="train", data_dir=str(tmp_path))
        assert len(source) == 24 and source[0]["image"].shape == shape
        epoch, images, labels = next(batches(source, batch_size=8, seed=0))
        assert images.shape == (8, *shape) and labels.shape == (8,) and epoch == 0


def test_bad_arguments(digits_dir):
    with pytest.raises(ValueError, match="dataset must be one of 'cifar10', 'digits', 'mnist'"):
        data_source("imagenet")
    with pytest.raises(ValueError, match="split must be one of 'test', 'train'"):
        data_source("digits", split="validation", data_dir=digits_dir)
    source = data_source("digits", split="test", data_dir=digits_dir)
    with pytest.raises(ValueError, match="batch_size 500 is larger than this process's share"):
        next(batches(source, batch_size=500))
    with pytest.raises(ValueError, match="the data source is empty"):
        next(batches([], batch_size=1))
