"""Filesystems for local paths and s3:// URLs (fsspec, pyarrow) failing in seconds with a StorageError."""

import contextlib
import io
import logging
import os
import posixpath
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import botocore.session
import fsspec
import pyarrow.fs as pafs
import s3fs
from botocore.credentials import RefreshableCredentials
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

# Environment variables naming an S3-compatible endpoint (MinIO, Ceph, moto), most specific first. Botocore
# reads the first two itself; STAL_S3_ENDPOINT is ours, for setups that must not redirect other AWS tools.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "STAL_S3_ENDPOINT")

# Short enough that a wrong endpoint fails in seconds. read_timeout bounds one wait for the server (its answer
# to a request, or the next bytes of one), not the upload of a part: S3 answers in well under a second.
CONNECT_TIMEOUT_S = 2
READ_TIMEOUT_S = 10
# botocore attempts per request (first try included) and s3fs's own retry loop around them (it retries read
# timeouts too). A server that accepts connections and never answers is given up on after
# READ_TIMEOUT_S x BOTOCORE_ATTEMPTS x S3FS_RETRIES = 40 s plus about 2 s of backoff: a clear error within a
# minute (30 s x 4 x 3 here before was 393 s of silence).
BOTOCORE_ATTEMPTS = 2
S3FS_RETRIES = 2

_CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment "
                     "of this process and of every Ray node")


class StorageError(OSError):
    """A URI that cannot be used: the message names it and the likely fix. Never contains credentials."""


def endpoint_from_env() -> str | None:
    """The S3 endpoint set in the environment, or None for AWS itself."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def endpoint_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint, with the fix; None when it is an http(s)://host[:port] URL."""
    fix = "give it as http(s)://host[:port], e.g. http://127.0.0.1:9000 or https://s3.eu-west-1.amazonaws.com"
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return f"{url!r} has an invalid port: {fix}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an endpoint URL: {fix}"
    return None


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def filesystem(uri: str, *, endpoint_url: str | None = None,
               check: bool = True) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path, file:// or s3://bucket/prefix URI.

    S3 credentials come from the usual AWS chain (environment variables, profile, instance role); the endpoint
    from `endpoint_url`, else the first of ENDPOINT_VARIABLES that is set, else AWS. With check=True the
    bucket is probed once (one HEAD request), so a missing bucket, wrong endpoint or missing credentials
    raise StorageError here, in seconds, instead of deep inside a write.
    """
    if not uri or not uri.strip():
        raise StorageError("empty storage URI: give a local directory or s3://bucket/prefix")
    if is_s3(uri):
        return _s3(uri, endpoint_url or endpoint_from_env(), check)
    if "://" not in uri or uri.startswith("file://"):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    # any other fsspec protocol (gs://, memory://, ...) as fsspec resolves it; untested here
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise StorageError(f"{uri}: unsupported storage URI ({error}); use a local path or s3://") from None


def arrow_filesystem(uri: str, *, endpoint_url: str | None = None,
                     check: bool = True) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for the same URI, for pyarrow.parquet and ray.data.read_parquet.

    It wraps the fsspec filesystem of `filesystem`, so both go through the same S3 client settings; it
    pickles (Ray ships it to the read tasks), and each node resolves credentials from its own environment.
    """
    fs, path = filesystem(uri, endpoint_url=endpoint_url, check=check)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def read_filesystem(uri: str, endpoint_url: str | None) -> pafs.FileSystem:
    """The pyarrow filesystem for Ray read tasks, with the S3 settings they need whatever their node's own.

    The endpoint travels already: `filesystem` resolves it here and the pickled s3fs keeps its constructor
    arguments. Credentials do not (each node would look up its own chain), so a Ray cluster started before
    they were set, or whose nodes lack them, fails to read. Static credentials that this process resolves
    (environment variables, a credentials file) are therefore passed in too; refreshable ones (instance
    role, assumed role, SSO) are not, since a frozen copy expires: nodes then resolve their own, as Ray's
    S3 readers do.
    """
    fs, _ = filesystem(uri, endpoint_url=endpoint_url, check=False)
    if not isinstance(fs, s3fs.S3FileSystem):
        return arrow_filesystem(uri, endpoint_url=endpoint_url, check=False)[0]
    options = dict(fs.storage_options)
    if not any(options.get(name) for name in ("key", "secret", "token", "anon", "profile", "session")):
        session = botocore.session.Session()
        credentials = session.get_credentials()
        if credentials is not None and not isinstance(credentials, RefreshableCredentials):
            frozen = credentials.get_frozen_credentials()
            options.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
        region = session.get_config_variable("region")
        if region:
            options["client_kwargs"] = {"region_name": region, **options.get("client_kwargs", {})}
        fs = type(fs)(**options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# --- Atomic writes: a reader sees the old file or the new one, never half of one. On local disk the bytes go
# to a temporary file in the same folder, renamed over the target (os.replace, atomic within a filesystem);
# on S3 (and other object stores) as one PUT, which the store makes visible whole or not at all.
# mode: permission bits of a new local file before the umask; 0o666 is what open() gives, 0o600 (this user
# only) what tempfile gives. fsync: flush the bytes to disk before the rename (survives a crash of the node).


def write_atomic(uri: str, data: bytes, *, endpoint_url: str | None = None, fsync: bool = False,
                 mode: int = 0o666) -> None:
    """`data` to a local path, file:// or s3:// URI in one step; a local folder is created if missing."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, check=False)
    if isinstance(fs, LocalFileSystem):
        put_atomic(fs, path, data, fsync=fsync, mode=mode)
        return
    with errors(uri, endpoint_url):
        put_atomic(fs, path, data)


def put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, fsync: bool = False,
               mode: int = 0o666) -> None:
    """write_atomic for a caller that holds the filesystem already: `path` is inside `fs`."""
    if isinstance(fs, LocalFileSystem):
        with _replacing(path, fsync=fsync, mode=mode) as out:
            out.write(data)
    else:
        fs.pipe_file(path, data)  # one PUT


@contextlib.contextmanager
def open_atomic(uri: str, *, endpoint_url: str | None = None, fsync: bool = False,
                mode: int = 0o666) -> Iterator[BinaryIO]:
    """A binary file to stream `uri`'s content into (torch.save, pyarrow.parquet.write_table, a download),
    put in place when the block ends without an error, dropped when it raises. Local: the temporary file
    itself; elsewhere an in-memory buffer, sent as one PUT at the end."""
    fs, path = filesystem(uri, endpoint_url=endpoint_url, check=False)
    if isinstance(fs, LocalFileSystem):
        with _replacing(path, fsync=fsync, mode=mode) as out:
            yield out
        return
    buffer = io.BytesIO()
    yield buffer
    with errors(uri, endpoint_url):
        fs.pipe_file(path, buffer.getvalue())


@contextlib.contextmanager
def _replacing(path: str, *, fsync: bool, mode: int) -> Iterator[BinaryIO]:
    """A new temporary file beside local `path`, renamed over it on success and removed on an error."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # .tmp-: the prefix publish.remove_unreferenced clears, should a killed process leave one behind
    temporary = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def join(uri: str, *parts: str) -> str:
    """uri/part/...: URIs are joined with '/', whatever the local separator."""
    return posixpath.join(uri.rstrip("/"), *parts) if "://" in uri else os.path.join(uri, *parts)


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (and ~ expanded) against this process's working directory; URLs as they
    are. For every path a job hands to Ray tasks, whose working directory is the cluster's, not the job's."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


@contextlib.contextmanager
def errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn S3 client, network and permission errors raised inside into a StorageError naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        translated = _translate(error, uri, endpoint_url)
        if translated is None:
            raise
        raise translated from error


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs with fewer retries of its own; a class attribute in s3fs (not a constructor argument), and a
    subclass keeps it when Ray pickles the filesystem to other nodes, where an instance attribute is lost."""

    retries = S3FS_RETRIES


def _s3(uri: str, endpoint_url: str | None, check: bool) -> tuple[fsspec.AbstractFileSystem, str]:
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; expected s3://bucket/prefix")
    if endpoint_url and endpoint_problem(endpoint_url):
        raise StorageError(f"{uri}: endpoint {endpoint_problem(endpoint_url)} (from --endpoint-url or "
                           f"{'/'.join(ENDPOINT_VARIABLES)})")
    fs = _S3FileSystem(
        endpoint_url=endpoint_url,
        config_kwargs={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            # total_max_attempts counts the first try; botocore's max_attempts would count retries only
            "retries": {"total_max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"},
        },
        # another process (a finished prepare job, a Ray node) may have written since we last listed
        use_listings_cache=False,
        # fsspec would otherwise hand back an instance made earlier, with the credentials it resolved then
        # (or failed to): a fix to the environment would not be seen until the process restarts
        skip_instance_cache=True,
    )
    path = uri.split("://", 1)[1].rstrip("/")
    if check:
        logger.debug("probing bucket %s at %s", bucket, endpoint_url or "AWS")
        with errors(uri, endpoint_url):
            fs.call_s3("head_bucket", Bucket=bucket)
    return fs, path


def _translate(error: Exception, uri: str, endpoint_url: str | None) -> StorageError | None:
    """A StorageError with the likely fix for a known failure, None for anything else."""
    endpoint_url = endpoint_url or endpoint_from_env()
    where = f"endpoint {endpoint_url}" if endpoint_url else "the default AWS endpoint"
    names = {cls.__name__ for cls in type(error).__mro__}
    text = str(error)
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return StorageError(f"{uri}: no usable AWS credentials ({type(error).__name__}); {_CREDENTIALS_HINT}")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ConnectionRefusedError"}:
        return StorageError(f"{uri}: cannot reach {where} ({type(error).__name__}); check --endpoint-url or "
                            f"{'/'.join(ENDPOINT_VARIABLES)}, and that the server is up and reachable")
    if names & {"ReadTimeoutError", "TimeoutError"}:
        return StorageError(f"{uri}: {where} stopped answering ({type(error).__name__}); check the network "
                            "and the server's load, then re-run")
    # HEAD answers a missing bucket with a bare 404; PUT and LIST say NoSuchBucket in words
    missing_bucket = text in ("Not Found", "404") or any(
        words in text for words in ("specified bucket does not exist", "NoSuchBucket"))
    if is_s3(uri) and isinstance(error, FileNotFoundError) and missing_bucket:
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        return StorageError(f"{uri}: bucket {bucket!r} does not exist at {where}; create it "
                            f"(aws s3 mb s3://{bucket}) or fix the URI / --endpoint-url")
    if not is_s3(uri):
        # only errors about the URI's own path (or a parent): a missing input file elsewhere is not ours
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        name = str(getattr(error, "filename", None) or "")
        if isinstance(error, OSError) and name and (name.startswith(path) or path.startswith(name)):
            return StorageError(f"{uri}: cannot use this folder ({error.strerror or error}: {name}); "
                                "choose one this user can create and write to")
        return None
    if isinstance(error, PermissionError) or text in ("Forbidden", "403") or any(
            code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
        return StorageError(f"{uri}: access denied at {where} ({text or type(error).__name__}); "
                            f"check the credentials and the bucket policy; {_CREDENTIALS_HINT}")
    return None


def check_output_folder(uri: str, setting: str, *, endpoint_url: str | None = None) -> None:
    """Refuse, in seconds and before any work, an output folder that cannot be written: a local path that
    is a file (or under one), or that this user cannot create or write; an s3:// prefix that is an object
    or whose bucket is unreachable. `setting` names where it came from (--out, train.storage_path)."""
    fix = f"choose another {setting}"
    if is_s3(uri):
        fs, path = filesystem(uri, endpoint_url=endpoint_url)  # probes the bucket
        with errors(uri, endpoint_url):
            if fs.isfile(path):
                raise StorageError(f"{setting} {uri} is an object, not a folder: {fix}")
        return
    if "://" in uri and not uri.startswith("file://"):
        return  # another fsspec protocol: its own errors, at the first write
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "a file" if existing == path else f"under {existing}, which is a file"
        raise StorageError(f"{setting} {uri} is {what}, not a folder: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{setting} {uri}: {existing} is not writable by this user: {fix}")
