"""``openclip_tau.data.tarfile_to_samples_nothrow``: open_clip_train's shard reader under
webdataset 1.0.2 reads every sample and closes every shard file it opens.

webdataset's ``url_opener`` opens each shard and never closes it; the file is then closed by
the garbage collector with ``ResourceWarning: unclosed file``. A ResourceWarning raised in a
finalizer is not an exception the test sees, so the warnings are recorded and counted.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import webdataset as wds

from openclip_tau.data import tarfile_to_samples_nothrow

SHARDS, PER_SHARD = 3, 4


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    paths = []
    for shard in range(SHARDS):
        path = root / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for item in range(PER_SHARD):
                sink.write({"__key__": f"{shard:03d}{item:03d}", "txt": f"caption {item}"})
        paths.append(str(path))
    return paths


def unclosed_files(read) -> list[str]:
    """The ResourceWarnings that ``read()`` and the collection after it emit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        read()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_every_sample_is_read_and_every_shard_closed(urls: list[str]) -> None:
    samples: list[dict] = []

    def read() -> None:
        samples.extend(tarfile_to_samples_nothrow(iter([{"url": u} for u in urls])))

    assert unclosed_files(read) == []
    assert [s["__key__"] for s in samples] == [
        f"{shard:03d}{item:03d}" for shard in range(SHARDS) for item in range(PER_SHARD)
    ]
    assert {s["__url__"] for s in samples} == set(urls)
    assert samples[0]["txt"] == b"caption 0"


def test_a_pipeline_stopped_early_closes_its_open_shard(urls: list[str]) -> None:
    def read() -> None:
        samples = tarfile_to_samples_nothrow(iter([{"url": u} for u in urls]))
        first = next(samples)
        assert first["__key__"] == "000000"
        samples.close()

    assert unclosed_files(read) == []


def test_the_check_sees_an_unclosed_file(urls: list[str]) -> None:
    """The count above would find a file left open (the webdataset reader alone leaves them)."""
    from webdataset.tariterators import tar_file_expander, url_opener

    def read() -> None:
        list(tar_file_expander(url_opener(iter([{"url": u} for u in urls]))))

    assert len(unclosed_files(read)) == SHARDS
