"""tfds sources: the offline digits builder, mnist/cifar10 through tfds mock data, the batch iterator."""

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from fmjax.data.tfds_sources import _example_decoder, batches, data_source, read_batch, to_model_space


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


class PngImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Random PNG images and class labels, stored as cifar10 and mnist are (Image + ClassLabel)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="rgb32"), tfds.core.BuilderConfig(name="gray28")]
    pkg_dir_path = epath.Path(__file__).parent  # a test module is no package for tfds to find its metadata in

    @property
    def shape(self):
        return (32, 32, 3) if self.builder_config.name == "rgb32" else (28, 28, 1)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=self.shape),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(300):
            # half noise, half smooth: both PNG filter kinds
            image = rng.integers(0, 256, self.shape, dtype=np.uint8)
            if i % 2:
                image = np.sort(image, axis=1)
            # PIL encodes the PNG (tfds would need TensorFlow for an array)
            yield (
                i,
                {
                    "id": str(i),
                    "image": Image.fromarray(image.squeeze(-1) if self.shape[-1] == 1 else image),
                    "label": int(rng.integers(10)),
                },
            )


def _per_record(source, indices):
    """The reads batches() did before read_batch, one record at a time."""
    records = [source[int(i)] for i in indices]
    return np.stack([r["image"] for r in records]), np.asarray([r["label"] for r in records], np.int32)


def _assert_bitwise_equal(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.fixture(scope="module")
def png_sources(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("png"))
    sources = {}
    for config in ("rgb32", "gray28"):
        builder = PngImages(config=config, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
        sources[config] = builder.as_data_source(split="train")
    return sources


def test_read_batch_equals_per_record_reads_bitwise(digits_dir, png_sources):
    sources = {"digits": data_source("digits", split="train", data_dir=digits_dir), **png_sources}
    rng = np.random.default_rng(1)
    for name, source in sources.items():
        # these all take the batched tf.Example path, not a fallback
        assert _example_decoder(source) is not None, name
        indices = rng.integers(0, len(source), 200)  # any order, repeats included
        images, labels = read_batch(source, indices)
        _assert_bitwise_equal((images, labels), _per_record(source, indices))
        assert images.dtype == np.uint8 and labels.dtype == np.int32 and len(np.unique(labels)) > 5
        _assert_bitwise_equal(read_batch(source, indices[:1]), _per_record(source, indices[:1]))
        assert read_batch(source, indices.tolist())[0].shape == (200, *source[0]["image"].shape)


def test_batches_yield_the_per_record_reads_in_epoch_order(digits_dir, png_sources):
    """batches() is unchanged by read_batch: process r's slice of each global batch of the (seed, epoch)
    permutation, read record by record, epoch after epoch."""
    for source in (data_source("digits", split="train", data_dir=digits_dir), png_sources["rgb32"]):
        size, batch_size, process_count, seed = len(source), 64, 2, 7
        per_epoch = size // (batch_size * process_count)
        for rank in range(process_count):
            it = batches(
                source, batch_size=batch_size, seed=seed, process_index=rank, process_count=process_count
            )
            for step, (epoch, *got) in enumerate(itertools.islice(it, per_epoch + 2)):
                assert epoch == step // per_epoch
                order = np.random.default_rng([seed, epoch]).permutation(size)
                begin = (step % per_epoch) * batch_size * process_count + rank * batch_size
                _assert_bitwise_equal(got, _per_record(source, order[begin : begin + batch_size]))


def test_read_batch_falls_back_for_other_sources():
    rng = np.random.default_rng(2)
    records = [{"image": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "label": i % 10} for i in range(20)]
    indices = np.array([3, 3, 0, 19, 7])
    images, labels = read_batch(records, indices)  # a list: one record at a time
    np.testing.assert_array_equal(images, np.stack([records[i]["image"] for i in indices]))
    np.testing.assert_array_equal(labels, [3, 3, 0, 9, 7])
    assert labels.dtype == np.int32

    class BatchedSource:
        """A source with batch access: read_batch must go through __getitems__."""

        def __init__(self):
            self.calls = []

        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            raise AssertionError("read one record at a time")

        def __getitems__(self, keys):
            self.calls.append(keys)
            return [records[k] for k in keys]

    batched = BatchedSource()
    _assert_bitwise_equal(read_batch(batched, indices), (images, labels))
    assert batched.calls == [[3, 3, 0, 19, 7]] and all(type(k) is int for k in batched.calls[0])
    with pytest.raises(ValueError, match="indices must be a non-empty sequence of ints"):
        read_batch(records, [])
    with pytest.raises(ValueError, match="indices must be a non-empty sequence of ints"):
        read_batch(records, np.array([0.5]))


def test_preparing_a_dataset_prints_nothing_on_stdout(tmp_path, capsys):
    # tfds announces a preparation with print(); fmjax's stdout carries only results (doctests, piped output)
    source = data_source("digits", split="test", data_dir=str(tmp_path))
    captured = capsys.readouterr()
    assert len(source) == 360 and captured.out == ""
    assert "sklearn_digits" in captured.err  # the announcement, on stderr


def test_to_model_space():
    np.testing.assert_allclose(to_model_space(np.array([0, 255], np.uint8)), [-1.0, 1.0])


@pytest.mark.parametrize(("name", "shape"), [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_online_datasets_through_tfds_mock_data(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        source = data_source(name, split="train", data_dir=str(tmp_path))
        assert len(source) == 24 and source[0]["image"].shape == shape
        epoch, images, labels = next(batches(source, batch_size=8, seed=0))
        assert images.shape == (8, *shape) and labels.shape == (8,) and epoch == 0
        # mock_data's reader has a broken __getitems__: read_batch reads it one record at a time
        indices = np.array([5, 0, 23, 5])
        _assert_bitwise_equal(read_batch(source, indices), _per_record(source, indices))


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
