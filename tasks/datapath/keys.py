"""The secret key behind the keyed noise channel and the steganography payload.

One key file holds 32 random bytes as 64 hex characters. Whoever holds it can
reverse de-identified footage (together with the decoder weights), so the file
is created owner-only and its contents never reach a log, a repr or an error
message. What may be shown is `key_id`: a short one-way fingerprint that tells
which key a video, payload or catalog row belongs to.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KEY_ENV_VAR = "UUNET_KEY_FILE"
DEFAULT_KEY_PATH = Path(".keys/uunet.key")
SECRET_BYTES = 32
# Distinct prefixes keep the fingerprint and the derived seeds independent:
# knowing a key id says nothing about any seed made from the same secret.
_KEY_ID_DOMAIN = b"uunet-key-id-v1\x00"
_SEED_DOMAIN = b"uunet-seed-v1\x00"


class KeyFileError(Exception):
    """A key file is missing, unreadable or malformed (the message names the path only)."""


class KeyFilePermissionWarning(UserWarning):
    """A key file can be read by users other than its owner."""


@dataclass(frozen=True)
class Key:
    """A secret plus its public fingerprint; `repr` and `str` never show the secret."""

    secret: bytes = field(repr=False)
    key_id: str = field(init=False)
    # Where the key came from is bookkeeping, not identity: equal secrets are equal keys.
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < SECRET_BYTES:
            raise ValueError(f"a key secret must be at least {SECRET_BYTES} bytes")
        fingerprint = hashlib.sha256(_KEY_ID_DOMAIN + self.secret).hexdigest()[:16]
        object.__setattr__(self, "key_id", fingerprint)


def resolve_key_path(path: str | os.PathLike | None) -> Path:
    """Pick the key file: an explicit path, else $UUNET_KEY_FILE, else `.keys/uunet.key`."""
    if path is not None:
        return Path(path)
    from_env = os.environ.get(KEY_ENV_VAR)
    if from_env:
        return Path(from_env)
    return DEFAULT_KEY_PATH


def load_key(path: str | os.PathLike) -> Key:
    """Read a key file; raise `KeyFileError` if it is missing or malformed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {path}") from None
    except OSError as error:
        raise KeyFileError(f"cannot open key file {path}: {error.strerror}") from None
    try:
        # fstat on the open descriptor checks the very file we read, not a name
        # that could be swapped in between.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file is not a regular file: {path}")
        raw = os.read(fd, 4 * SECRET_BYTES)
    except OSError as error:
        raise KeyFileError(f"cannot read key file {path}: {error.strerror}") from None
    finally:
        os.close(fd)

    if info.st_mode & 0o077:
        warnings.warn(
            f"key file {path} is accessible by group/others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`",
            KeyFilePermissionWarning,
            stacklevel=2,
        )
    return Key(_parse_secret(raw, path), path)


def _parse_secret(raw: bytes, path: Path) -> bytes:
    text = raw.strip()
    if len(text) < 2 * SECRET_BYTES:
        raise KeyFileError(
            f"key file {path} is too short: expected {2 * SECRET_BYTES} hex characters"
        )
    if len(text) != 2 * SECRET_BYTES or not all(c in b"0123456789abcdefABCDEF" for c in text):
        raise KeyFileError(
            f"key file {path} is malformed: expected exactly {2 * SECRET_BYTES} hex characters"
        )
    return bytes.fromhex(text.decode("ascii"))


def load_or_create_key(path: str | os.PathLike) -> tuple[Key, bool]:
    """Load the key at `path`, creating a fresh random one if none exists.

    Returns the key and whether this call created it. Safe against concurrent
    callers: exactly one file is ever published and everyone ends up with it.
    """
    path = Path(path)
    if path.exists():
        return load_key(path), False

    _make_private_dirs(path.parent)
    secret = secrets.token_bytes(SECRET_BYTES)
    # Write the complete key under a unique temporary name, then publish it with
    # link(), which fails if the name exists. A concurrent reader therefore never
    # sees a half-written key, and a concurrent creator never overwrites ours.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret.hex().encode("ascii") + b"\n")
            # Losing this file makes every video de-identified with it irreversible.
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return load_key(path), False
    except OSError as error:
        raise KeyFileError(f"cannot create key file {path}: {error.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return Key(secret, path), True


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing ancestors as owner-only (0700)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
        except FileExistsError:
            pass


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def derive_seed(key: Key, *parts: str | int) -> int:
    """A 64-bit seed from HMAC-SHA256 over `parts`; different parts never collide by encoding.

    Each part is tagged with its type and length, so ("ab", "c") and ("a", "bc"),
    or 1 and "1", are different inputs.
    """
    message = bytearray(_SEED_DOMAIN)
    for part in parts:
        if isinstance(part, str):
            tag, data = b"s", part.encode("utf-8")
        elif isinstance(part, int) and not isinstance(part, bool):
            tag, data = b"i", str(part).encode("ascii")
        else:
            raise TypeError(f"seed parts must be str or int, got {type(part).__name__}")
        message += tag + len(data).to_bytes(4, "big") + data
    digest = hmac.new(key.secret, bytes(message), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big")


def keyed_noise(key: Key, video_id: str, seq_id: int, size: int = 64) -> np.ndarray:
    """The (size, size) float32 noise channel in [0, 1) for one sequence of one video.

    The same key, video and sequence always give the same noise (one virtual
    identity per sequence); without the key the noise cannot be reproduced.
    """
    if size <= 0:
        raise ValueError(f"noise size must be positive, got {size}")
    rng = np.random.default_rng(derive_seed(key, "noise", video_id, seq_id))
    return rng.random((size, size), dtype=np.float32)
