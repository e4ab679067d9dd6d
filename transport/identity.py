"""Node identities: an Ed25519 signing key bound to a node id and a role.

The private file is a small TOML document written with mode 0600 (tmp file -> fsync ->
``os.replace`` -> fsync the directory); the public half travels as one printable line,
``"<id> <role> <base64 public key>"``, which is what an operator pastes into a roster.
The identity key signs (handshake transcripts, update envelopes, models, rosters); the
handshake's key exchange uses separate ephemeral ``crypto_kx`` keys. Its one other use:
relayed envelopes are encrypted to it, converted to X25519 (``transport.relay``, which
says why that joint use is sound), so the roster needs one key per node.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# Roles of the daemons (topology.plan.ROLES) plus the consortium key that signs rosters.
ROLES: tuple[str, ...] = ("root", "region", "site", "peer", "relay", "consortium")
# Ids appear in file names, public lines and TOML: keep them to a safe, printable set.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class IdentityError(ValueError):
    """An identity file, id, role or key text is wrong; the message says what and where."""


def check_node_id(node_id: object) -> str:
    """``node_id`` if it is a valid id (1-128 of ``A-Z a-z 0-9 . _ : @ + -``, no leading
    punctuation), else ``IdentityError``."""
    if not isinstance(node_id, str) or _ID_RE.fullmatch(node_id) is None:
        raise IdentityError(
            f"invalid node id {node_id!r}: use 1-128 letters, digits or . _ : @ + - "
            "starting with a letter or digit"
        )
    return node_id


def check_role(role: object) -> str:
    if not isinstance(role, str) or role not in ROLES:
        raise IdentityError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def key_text(public_key: bytes) -> str:
    """The printable (standard base64) form of a 32-byte public key."""
    return base64.b64encode(public_key).decode("ascii")


def parse_key(text: str, what: str = "public key") -> bytes:
    """Decode a base64 32-byte key; ``IdentityError`` naming ``what`` if it is not one."""
    try:
        raw = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise IdentityError(f"{what}: not valid base64") from None
    if len(raw) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"{what}: expected {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return raw


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        # BadSignatureError, or a key that is not a valid curve point.
        return False
    return True


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of an identity, as printed by ``Identity.public_line``."""

    node_id: str
    role: str
    public_key: bytes

    def line(self) -> str:
        return f"{self.node_id} {self.role} {key_text(self.public_key)}"


def parse_public_line(line: str) -> PublicIdentity:
    """Parse ``"<id> <role> <base64 public key>"`` (``IdentityError`` if malformed)."""
    parts = line.split()
    if len(parts) != 3:
        raise IdentityError(
            f"public line must be '<id> <role> <base64 key>', got {len(parts)} field(s)"
        )
    node_id, role, key = parts
    return PublicIdentity(check_node_id(node_id), check_role(role), parse_key(key))


class Identity:
    """A node's long-term signing identity (keep the private file secret)."""

    __slots__ = ("_public_key", "node_id", "role", "signing_key")

    def __init__(self, node_id: str, role: str, signing_key: nacl.signing.SigningKey) -> None:
        self.node_id = check_node_id(node_id)
        self.role = check_role(role)
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError(f"signing_key must be a nacl SigningKey, got {type(signing_key)}")
        self.signing_key = signing_key
        self._public_key = bytes(signing_key.verify_key)

    @classmethod
    def generate(cls, node_id: str, role: str = "site") -> Identity:
        return cls(node_id, role, nacl.signing.SigningKey.generate())

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.node_id, self.role, self._public_key)

    def public_line(self) -> str:
        return self.public.line()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature

    def __repr__(self) -> str:  # never the private key
        return f"Identity({self.node_id!r}, {self.role!r}, {key_text(self._public_key)})"

    # ------------------------------------------------------------------ files
    def save(
        self, directory: str | os.PathLike[str], *, overwrite: bool = False
    ) -> tuple[Path, Path]:
        """Write ``<id>.key`` (mode 0600) and ``<id>.pub`` into ``directory``; return both paths.

        Refuses to replace an existing private key unless ``overwrite`` (losing a key
        locks the node out of the consortium until the roster is re-signed).
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        private = folder / f"{self.node_id}{PRIVATE_SUFFIX}"
        public = folder / f"{self.node_id}{PUBLIC_SUFFIX}"
        if private.exists() and not overwrite:
            raise FileExistsError(f"{private} already exists (refusing to overwrite a key)")
        seed = base64.b64encode(bytes(self.signing_key)).decode("ascii")
        text = (
            "# fedloom identity: PRIVATE signing key, keep this file secret (mode 0600)\n"
            f'id = "{self.node_id}"\n'
            f'role = "{self.role}"\n'
            f'private_key = "{seed}"\n'
            f'public_key = "{key_text(self._public_key)}"\n'
        )
        write_atomic(private, text.encode("ascii"), mode=0o600)
        write_atomic(public, (self.public_line() + "\n").encode("ascii"), mode=0o644)
        return private, public

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a private identity file; refuses one that group or others may read."""
        file = Path(path)
        try:
            mode = file.stat().st_mode
            raw = file.read_bytes()
        except FileNotFoundError:
            raise IdentityError(f"{file}: identity file not found") from None
        except OSError as exc:
            raise IdentityError(f"{file}: cannot read identity file ({exc.strerror})") from None
        if stat.S_IMODE(mode) & 0o077:
            raise IdentityError(
                f"{file}: private key is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {file}"
            )
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise IdentityError(f"{file}: not an identity file ({exc})") from None
        fields = {"id", "role", "private_key", "public_key"}
        if set(data) != fields or not all(isinstance(data[k], str) for k in fields):
            raise IdentityError(
                f"{file}: not an identity file (expected string fields {', '.join(sorted(fields))})"
            )
        try:
            seed = parse_key(data["private_key"], "private_key")
            identity = cls(data["id"], data["role"], nacl.signing.SigningKey(seed))
            expected = parse_key(data["public_key"], "public_key")
        except IdentityError as exc:
            raise IdentityError(f"{file}: {exc}") from None
        if identity.public_key != expected:
            raise IdentityError(f"{file}: public_key does not match private_key")
        return identity


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """tmp file (created with ``mode``) -> fsync -> ``os.replace`` -> fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
