"""storage: a server that accepts and never answers is given up on within a minute; a bad endpoint URL or a
relative path is dealt with where it is given."""

import socket
import threading
import time

import pytest
from conftest import FAKE_AWS_ENV, UNSET_AWS_ENV

from stal_ray.core import storage
from stal_ray.core.storage import StorageError, endpoint_problem, filesystem


@pytest.fixture()
def silent_server():
    """http://127.0.0.1:PORT of a socket that accepts every connection and never sends a byte; and the
    connections it accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept_forever():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:  # the listener was closed
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


@pytest.fixture()
def fake_credentials(monkeypatch):
    for name, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in UNSET_AWS_ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_server_that_never_answers_fails_within_a_minute(silent_server, fake_credentials, monkeypatch):
    # the defaults give up after READ_TIMEOUT_S x BOTOCORE_ATTEMPTS x S3FS_RETRIES seconds of waiting, plus
    # backoff; the test waits on a 2 s read timeout instead of 10 s, and checks the defaults' sum separately
    waited = storage.READ_TIMEOUT_S * storage.BOTOCORE_ATTEMPTS * storage.S3FS_RETRIES
    assert waited <= 45, f"the defaults wait {waited} s for a silent server before the error"
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 2)
    url, accepted = silent_server
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://bucket/mars: endpoint {url} stopped answering"):
        filesystem("s3://bucket/mars", endpoint_url=url)
    elapsed = time.monotonic() - start
    assert accepted, "the request never reached the server: this test is of a silent server, not a dead one"
    limit = 2 * storage.BOTOCORE_ATTEMPTS * storage.S3FS_RETRIES + 15
    assert elapsed < limit, f"{elapsed:.0f} s before the error"


@pytest.mark.parametrize("url", ["not-a-url", "127.0.0.1:9000", "ftp://host", "http://", "http://host:port"])
def test_an_endpoint_that_is_not_a_url_is_named_with_the_fix(url):
    assert "http(s)://host[:port]" in endpoint_problem(url)
    with pytest.raises(StorageError, match=r"s3://bucket/mars: endpoint .* http\(s\)://host\[:port\]"):
        filesystem("s3://bucket/mars", endpoint_url=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com", "http://minio"])
def test_endpoint_urls_are_accepted(url):
    assert endpoint_problem(url) is None


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/a") == str(tmp_path / "runs" / "a")
    assert storage.absolute("/data/x") == "/data/x"
    assert storage.absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.absolute(None) is None


def test_an_atomic_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "new" / "folder" / "file.bin"
    storage.write_atomic(str(target), b"first")
    storage.write_atomic(f"file://{target}", b"second", mode=0o600, fsync=True)
    assert target.read_bytes() == b"second" and target.stat().st_mode & 0o777 == 0o600
    with pytest.raises(RuntimeError, match="cut short"), storage.open_atomic(str(target)) as out:
        out.write(b"half of a thi")
        raise RuntimeError("cut short")
    assert target.read_bytes() == b"second"  # a failed write leaves the old file as it was
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_an_atomic_write_to_an_object_store_is_one_put_at_the_end():
    storage.write_atomic("memory://atomic/one.bin", b"bytes")
    with pytest.raises(RuntimeError), storage.open_atomic("memory://atomic/two.bin") as out:
        out.write(b"half")
        raise RuntimeError("cut short")
    fs, _ = storage.filesystem("memory://atomic")
    assert fs.cat_file("/atomic/one.bin") == b"bytes" and not fs.exists("/atomic/two.bin")
