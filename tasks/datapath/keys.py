"""Keys: the authorities' key pairs, and the fresh data key every video is sealed with.

Who holds what:
- An **authority** holds a private key (PKCS#8 PEM, as `openssl genpkey -algorithm X25519`
  writes it) and hands out its public key (`openssl pkey -pubout`). A post-quantum hybrid
  pair, ML-KEM-768 + X25519, is one file holding both PEM blocks (`generate_key_pair`).
- The **anonymizer** holds public keys only. Per video it draws a random 32-byte
  `DataKey`, wraps it for every authority with HPKE (RFC 9180: the KEM of the
  authority's key, HKDF-SHA256, AES-256-GCM) and forgets it when the video is written.
  Each authority can unwrap it alone; nobody else can.
- From the data key come, by HKDF, the payload's HMAC key, the key of the sealed
  originals and every sequence's noise seed: whoever has unwrapped one video's data key
  can reverse that video and no other.

All cryptography is the `cryptography` package's. What logs, catalogs and payloads show is
a key's `fingerprint` (16 hex digits of a domain-separated SHA-256 of the raw public key),
never a key.

`python -m tasks.datapath.keys generate DIR [--kem mlkem768-x25519]` writes a pair.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEFAULT_PUBLIC_KEY = Path(".keys/authority.pub")
DEFAULT_PRIVATE_KEY = Path(".keys/authority.key")
SECRET_BYTES = 32
KEMS = {"x25519": hpke.KEM.X25519, "mlkem768-x25519": hpke.KEM.MLKEM768_X25519}
_SUITES = {name: hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM) for name, kem in KEMS.items()}
# Distinct domains keep fingerprints, derived keys and seeds independent of each other.
_FINGERPRINT_DOMAIN = b"uunet-authority-key-v1\x00"
_KEY_ID_DOMAIN = b"uunet-key-id-v1\x00"
_SEED_DOMAIN = b"uunet-seed-v1\x00"
_WRAP_INFO = b"uunet-data-key-v1\x00"
_DERIVE_INFO = b"uunet-derived-v1\x00"
_NOISE_DOMAIN = b"uunet-noise-v1\x00"
_MAX_KEY_FILE_BYTES = 64 * 1024
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----", re.S)
_OLD_SYMMETRIC_KEY = re.compile(rb"\s*[0-9a-fA-F]{64}\s*")


class KeyFileError(Exception):
    """A key file is missing, unreadable, of the wrong kind or malformed (the message names the path only)."""


class NotARecipientError(Exception):
    """A private key that the video was not sealed to."""


class EnvelopeError(Exception):
    """A wrapped data key that is damaged or was tampered with."""


class KeyFilePermissionWarning(UserWarning):
    """A private key file can be read by users other than its owner."""


# ----------------------------------------------------------------------------------------
# Authority keys
# ----------------------------------------------------------------------------------------

def _raw_public(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(_FINGERPRINT_DOMAIN + raw).hexdigest()[:16]


@dataclass(frozen=True)
class AuthorityPublicKey:
    """One authority's public key: what the anonymizer seals every video's data key to."""

    kem: str  # a KEMS name
    key: Any = field(repr=False)  # X25519PublicKey or MLKEM768X25519PublicKey
    fingerprint: str
    path: Path | None = field(default=None, compare=False)
    pem: bytes = field(default=b"", repr=False, compare=False)

    def __reduce__(self):
        # cryptography's key objects do not pickle; the PEM does (Ray hands keys to its actors).
        return parse_public_key, (self.pem, self.path)


@dataclass(frozen=True)
class AuthorityPrivateKey:
    """One authority's private key; `repr` and `str` never show it."""

    kem: str
    key: Any = field(repr=False)
    public: AuthorityPublicKey
    path: Path | None = field(default=None, compare=False)
    pem: bytes = field(default=b"", repr=False, compare=False)

    def __reduce__(self):
        return parse_private_key, (self.pem, self.path)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint


def _public_from_parts(parts: dict[str, Any], path: Path | None, pem: bytes = b"") -> AuthorityPublicKey:
    if set(parts) == {"x25519"}:
        raw = _raw_public(parts["x25519"])
        return AuthorityPublicKey("x25519", parts["x25519"], _fingerprint(raw), path, pem)
    mlkem_key, x_key = parts["mlkem768"], parts["x25519"]
    raw = _raw_public(mlkem_key) + _raw_public(x_key)
    return AuthorityPublicKey("mlkem768-x25519", hpke.MLKEM768X25519PublicKey(mlkem_key, x_key),
                              _fingerprint(raw), path, pem)


def _read_key_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"key file not found: {path}") from None
    except OSError as error:
        raise KeyFileError(f"cannot open key file {path}: {error.strerror}") from None
    try:
        # fstat on the open descriptor checks the very file we read, not a name swapped in between.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file is not a regular file: {path}")
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read key file {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    if _OLD_SYMMETRIC_KEY.fullmatch(raw):
        raise KeyFileError(
            f"{path} is a symmetric key of the old format (64 hex digits, the former .keys/uunet.key). "
            "Streams are now sealed to authority key pairs: make one with "
            "`python -m tasks.datapath.keys generate .keys` (or `openssl genpkey -algorithm X25519 -out "
            "authority.key` and `openssl pkey -in authority.key -pubout -out authority.pub`), give the "
            "anonymizer the .pub and keep the .key with the authority. Public streams made with the old key "
            "can only be reversed by the release that made them.")
    if len(raw) > _MAX_KEY_FILE_BYTES or not _PEM_BLOCK.search(raw):
        raise KeyFileError(f"{path} is not a key file: expected PEM (BEGIN PUBLIC KEY or BEGIN PRIVATE KEY)")
    if info.st_mode & 0o077 and b"PRIVATE KEY" in raw:
        warnings.warn(f"private key file {path} is accessible by group/others; run `chmod 600 {path}`",
                      KeyFilePermissionWarning, stacklevel=3)
    return raw


def _parse_blocks(raw: bytes, path: Path | None) -> tuple[str, dict[str, Any]]:
    """("public" | "private", {"x25519": key, "mlkem768": key}) of a PEM file."""
    kinds, parts = set(), {}
    for block in _PEM_BLOCK.finditer(raw):
        label = block.group(1).decode()
        try:
            if label == "PUBLIC KEY":
                key, kind = serialization.load_pem_public_key(block.group(0)), "public"
            elif label == "PRIVATE KEY":
                key, kind = serialization.load_pem_private_key(block.group(0), password=None), "private"
            elif label == "ENCRYPTED PRIVATE KEY":
                raise KeyFileError(f"{path} is a passphrase-protected private key; store it decrypted on the "
                                   "authority's own machine (`openssl pkey -in K -out K2`)")
            else:
                raise KeyFileError(f"{path} holds a {label}, not an authority key")
        except (ValueError, TypeError) as error:
            raise KeyFileError(f"{path} is not a readable key file: {error}") from None
        except Exception as error:  # cryptography raises UnsupportedAlgorithm for unknown key types
            if isinstance(error, KeyFileError):
                raise
            raise KeyFileError(f"{path} is not a readable key file: {error}") from None
        if isinstance(key, (x25519.X25519PublicKey, x25519.X25519PrivateKey)):
            name = "x25519"
        elif isinstance(key, (mlkem.MLKEM768PublicKey, mlkem.MLKEM768PrivateKey)):
            name = "mlkem768"
        else:
            raise KeyFileError(f"{path} holds a {type(key).__name__.removesuffix('Key')} key; authority keys "
                               "are X25519 (or ML-KEM-768 + X25519)")
        if name in parts:
            raise KeyFileError(f"{path} holds two {name} keys; one authority key per file")
        kinds.add(kind)
        parts[name] = key
    if len(kinds) != 1:
        raise KeyFileError(f"{path} mixes public and private keys")
    if set(parts) not in ({"x25519"}, {"x25519", "mlkem768"}):
        raise KeyFileError(f"{path}: an ML-KEM-768 key needs its X25519 half in the same file")
    return kinds.pop(), parts


def load_public_key(path: str | os.PathLike) -> AuthorityPublicKey:
    """An authority's public key; a private key here is refused (it must never reach the anonymizer)."""
    path = Path(path)
    return parse_public_key(_read_key_file(path), path)


def load_private_key(path: str | os.PathLike) -> AuthorityPrivateKey:
    """An authority's private key; a public key here gets a clear error."""
    path = Path(path)
    return parse_private_key(_read_key_file(path), path)


def parse_public_key(pem: bytes, path: Path | None = None) -> AuthorityPublicKey:
    kind, parts = _parse_blocks(pem, path)
    if kind == "private":
        pub = path.with_suffix(".pub") if path else "authority.pub"
        raise KeyFileError(
            f"{path} is a private key. The anonymizer takes public keys only (`openssl pkey -in {path} "
            f"-pubout -out {pub}`); keep the private key off the anonymizing host.")
    return _public_from_parts(parts, path, pem)


def parse_private_key(pem: bytes, path: Path | None = None) -> AuthorityPrivateKey:
    kind, parts = _parse_blocks(pem, path)
    if kind == "public":
        raise KeyFileError(f"{path} is a public key; reconstruct needs the authority's private key "
                           "(the .key file beside it, PKCS#8 PEM)")
    public = _public_from_parts({name: key.public_key() for name, key in parts.items()}, path)
    if public.kem == "x25519":
        return AuthorityPrivateKey("x25519", parts["x25519"], public, path, pem)
    return AuthorityPrivateKey(public.kem, hpke.MLKEM768X25519PrivateKey(parts["mlkem768"], parts["x25519"]),
                               public, path, pem)


def generate_key_pair(kem: str = "x25519") -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a new authority key; the X25519 PEMs are openssl's own formats."""
    if kem not in KEMS:
        raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(KEMS)}")
    keys = [x25519.X25519PrivateKey.generate()]
    if kem == "mlkem768-x25519":
        keys.insert(0, mlkem.MLKEM768PrivateKey.generate())
    private = b"".join(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()) for k in keys)
    public = b"".join(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo) for k in keys)
    return private, public


def write_key_pair(private_path: str | os.PathLike, public_path: str | os.PathLike,
                   kem: str = "x25519") -> AuthorityPublicKey:
    """Create a new pair: the private file 0600 in owner-only (0700) folders, the public file 0644.

    Neither file may exist yet: an existing private key is never overwritten (losing it
    makes every video sealed to it irreversible).
    """
    private_path, public_path = Path(private_path), Path(public_path)
    private_pem, public_pem = generate_key_pair(kem)
    _publish(private_path, private_pem, 0o600)
    _publish(public_path, public_pem, 0o644)
    return load_public_key(public_path)


def _publish(path: Path, data: bytes, mode: int) -> None:
    """Write `data` under a unique temporary name, then link() it into place, which fails if the name exists."""
    _make_private_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, mode)  # the umask may have narrowed the public file's mode
        os.link(temporary, path)
    except FileExistsError:
        raise KeyFileError(f"{path} exists already; it is never overwritten") from None
    except OSError as error:
        raise KeyFileError(f"cannot create key file {path}: {error.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def public_keys_for_anonymize(paths: Sequence[str | os.PathLike] | None) -> tuple[list[AuthorityPublicKey], bool]:
    """The recipients of an anonymize run, and whether a default pair was created just now.

    Explicit paths are loaded as they are. With none, `.keys/authority.pub` is used; when
    neither it nor `.keys/authority.key` exists, both are created (a first run on a
    workstation). The private key is never read here.
    """
    if paths:
        keys = [load_public_key(p) for p in paths]
        fingerprints = [k.fingerprint for k in keys]
        if len(set(fingerprints)) != len(fingerprints):
            raise KeyFileError(f"the same public key is given twice ({', '.join(fingerprints)})")
        return keys, False
    if DEFAULT_PUBLIC_KEY.exists():
        return [load_public_key(DEFAULT_PUBLIC_KEY)], False
    if DEFAULT_PRIVATE_KEY.exists():
        raise KeyFileError(f"{DEFAULT_PRIVATE_KEY} exists but {DEFAULT_PUBLIC_KEY} does not; make it with "
                           f"`openssl pkey -in {DEFAULT_PRIVATE_KEY} -pubout -out {DEFAULT_PUBLIC_KEY}`")
    return [write_key_pair(DEFAULT_PRIVATE_KEY, DEFAULT_PUBLIC_KEY)], True


# ----------------------------------------------------------------------------------------
# Symmetric keys: the per-video data key and what is derived from it
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """A symmetric secret plus its public fingerprint (`key_id`); `repr` and `str` never show the secret."""

    secret: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < SECRET_BYTES:
            raise ValueError(f"a key secret must be at least {SECRET_BYTES} bytes")
        object.__setattr__(self, "key_id", hashlib.sha256(_KEY_ID_DOMAIN + self.secret).hexdigest()[:16])


@dataclass(frozen=True)
class DataKey(Key):
    """One video's random data key; everything that reverses the video derives from it."""

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(SECRET_BYTES))

    def derive(self, label: str) -> bytes:
        return HKDF(hashes.SHA256(), SECRET_BYTES, salt=None,
                    info=_DERIVE_INFO + label.encode()).derive(self.secret)

    def payload_key(self) -> Key:
        """The HMAC key of the in-pixel payload."""
        return Key(self.derive("payload"))

    def seal_key(self) -> bytes:
        """The AES-256-GCM key of the sealed originals."""
        return self.derive("seal")

    def noise(self, seq_id: int, size: int = 64) -> np.ndarray:
        """Sequence `seq_id`'s noise channel: one virtual identity per sequence, a new one per video."""
        return fixed_noise(self.derive(f"noise/{int(seq_id)}"), size)


def fixed_noise(seed: bytes, size: int = 64) -> np.ndarray:
    """(size, size) float32 in [0, 1) from SHAKE-256 of the seed.

    The stream is this project's, fixed by FIPS 202 and pinned by a golden-value test, so
    an archive sealed today restores the same faces after any numpy upgrade (numpy does
    not promise `Generator.random`'s stream across versions). 24 bits per value: every
    value is an exact float32.
    """
    if size <= 0:
        raise ValueError(f"noise size must be positive, got {size}")
    words = np.frombuffer(hashlib.shake_256(_NOISE_DOMAIN + seed).digest(4 * size * size), dtype=">u4")
    return ((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)).reshape(size, size)


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


# ----------------------------------------------------------------------------------------
# The envelope: a video's data key wrapped for each authority
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WrappedKey:
    fingerprint: str
    kem: str
    blob: bytes = field(repr=False)  # HPKE enc || ciphertext


def _wrap_info(video_id: str) -> bytes:
    return _WRAP_INFO + video_id.encode("ascii")


def wrap_data_key(data_key: DataKey, recipients: Sequence[AuthorityPublicKey], video_id: str) -> list[WrappedKey]:
    """The data key sealed to each recipient; the video id is bound in, so an envelope cannot be moved."""
    if not recipients:
        raise ValueError("a video needs at least one recipient")
    return [WrappedKey(r.fingerprint, r.kem, _SUITES[r.kem].encrypt(data_key.secret, r.key, info=_wrap_info(video_id)))
            for r in recipients]


def unwrap_data_key(envelope: Sequence[WrappedKey], private: AuthorityPrivateKey, video_id: str) -> DataKey:
    for wrapped in envelope:
        if wrapped.fingerprint == private.fingerprint:
            if wrapped.kem != private.kem:
                raise EnvelopeError(f"video {video_id[:16]} was sealed to {wrapped.fingerprint} with {wrapped.kem}, "
                                    f"but that key is a {private.kem} key")
            try:
                return DataKey(_SUITES[wrapped.kem].decrypt(wrapped.blob, private.key, info=_wrap_info(video_id)))
            except InvalidTag:
                raise EnvelopeError(f"the data key wrapped for {private.fingerprint} does not open: "
                                    "damaged, tampered with, or moved from another video") from None
    names = ", ".join(w.fingerprint for w in envelope) or "nobody"
    raise NotARecipientError(f"video {video_id[:16]} is sealed to {names}; key {private.fingerprint} "
                             f"({private.path or 'given'}) is not one of them")


def envelope_to_bytes(envelope: Sequence[WrappedKey]) -> bytes:
    """Compact canonical JSON: what the sealed data's header and the in-pixel payload carry."""
    items = [{"fp": w.fingerprint, "kem": w.kem, "w": base64.b64encode(w.blob).decode("ascii")} for w in envelope]
    return json.dumps(items, separators=(",", ":"), sort_keys=True).encode("ascii")


def envelope_from_bytes(data: bytes) -> list[WrappedKey]:
    try:
        items = json.loads(data)
        envelope = [WrappedKey(str(i["fp"]), str(i["kem"]), base64.b64decode(i["w"], validate=True)) for i in items]
    except (ValueError, TypeError, KeyError) as error:
        raise EnvelopeError(f"malformed key envelope: {error}") from None
    if not envelope or any(w.kem not in KEMS for w in envelope):
        raise EnvelopeError("malformed key envelope: no recipient, or an unknown KEM")
    return envelope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.datapath.keys",
                                     description="Make an authority key pair (DIR/authority.key, DIR/authority.pub).")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="write a new pair; never overwrites")
    generate.add_argument("directory", type=Path)
    generate.add_argument("--kem", choices=sorted(KEMS), default="x25519",
                          help="mlkem768-x25519: post-quantum hybrid, for archives sealed for decades")
    generate.add_argument("--name", default="authority", help="file stem (default: authority)")
    args = parser.parse_args(argv)
    try:
        public = write_key_pair(args.directory / f"{args.name}.key", args.directory / f"{args.name}.pub", args.kem)
    except KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.directory / args.name}.key (keep it with the authority, back it up) and "
          f"{args.directory / args.name}.pub (give it to the anonymizer); fingerprint {public.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
