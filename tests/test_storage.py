"""cellfm.storage: joins, whole-file writes and exclusive create, on a local folder and on S3 (moto's
standalone server, the `s3_server` fixture; no mocked client). No Ray."""

from __future__ import annotations

import threading

import pytest

from cellfm.storage import create_exclusive, filesystem, join, replacing, write_file


def test_join_of_local_paths_and_urls():
    assert join("s3://bucket/prefix/", "/runs/", "a.json") == "s3://bucket/prefix/runs/a.json"
    assert join("s3://bucket", "x") == "s3://bucket/x"
    assert join("/data/store", "key/", "index.json") == "/data/store/key/index.json"
    assert join("relative/dir/", "f") == "relative/dir/f"


@pytest.fixture
def where(request, tmp_path, s3_server):
    """(a folder URL, storage options) on the local disk or in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "folder"), None
    return f"s3://{s3_server['bucket']}/storage-{request.node.name}", s3_server["storage_options"]


def _listing(folder: str, options: dict | None) -> list[str]:
    fs, path = filesystem(folder, options)
    return sorted(name.rsplit("/", 1)[-1] for name in fs.find(path))


@pytest.mark.parametrize("where", ["local", "s3"], indirect=True)
def test_write_file_replaces_whole_files(where):
    folder, options = where
    url = join(folder, "sub", "record.json")
    write_file(url, b"first", options)
    write_file(url, "second \u00e9", options)  # str: UTF-8
    fs, path = filesystem(url, options)
    assert fs.cat_file(path) == "second \u00e9".encode()
    assert _listing(folder, options) == ["record.json"]


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out" / "report.json"
    write_file(target, b"old content")

    class DiskFull(OSError):
        pass

    with pytest.raises(DiskFull):
        with replacing(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise DiskFull("disk full")
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]

    # The temporary file keeps the suffix, so a writer that goes by it (savefig, to_parquet) still works.
    with replacing(tmp_path / "out" / "plot.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path / "out" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert sorted(p.name for p in target.parent.iterdir()) == ["plot.png", "report.json"]


@pytest.mark.parametrize("where", ["local", "s3"], indirect=True)
def test_exclusive_create_wins_once_and_keeps_the_first_content(where):
    folder, options = where
    url = join(folder, "entry", "COMPLETE.json")
    assert create_exclusive(url, b"first", options) is True
    assert create_exclusive(url, b"second", options) is False
    fs, path = filesystem(url, options)
    assert fs.cat_file(path) == b"first"
    # Of simultaneous creators exactly one wins, and its content is what stays.
    race = join(folder, "race.json")
    results: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda i=i: results.append((i, create_exclusive(race, str(i).encode(), options))))
               for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [i for i, won in results if won]
    assert len(winners) == 1 and fs.cat_file(filesystem(race, options)[1]) == str(winners[0]).encode()
    assert _listing(folder, options) == ["COMPLETE.json", "race.json"]  # no temporary file left
