"""Keyed pseudonyms: HMAC-SHA256 under a secret key that never travels with the data.

Every identifier that ingest meets (PatientID, Study/Series UIDs, file and folder paths) and every
patient ID of a labels file becomes ``pseudonym(kind, value)``: the first 16 hex digits of
HMAC-SHA256(key, kind NUL value). Without the key nobody can recompute one from a guessed MRN or UID
(a keyed hash, unlike a salted one whose salt ships with the data, cannot be enumerated); with the same
key, two stores give one patient the same key.

The key is 32 random bytes, written as 64 hex digits in a file readable by its owner only (0600). Its
path: the one given (``fmct ingest --key FILE``), else ``$FMCT_KEY_FILE``, else
``~/.config/fmct/pseudonym.key``, made on first use. A store records only the key's fingerprint (a
SHA-256 of it, from which the key cannot be found), so a store shared without the key reveals nothing
recomputable.

Beside the key lies the local source map ``<key file>.sources.jsonl``: pseudonym -> real path, one JSON
object a line, owner-only, for the user who needs to find the file behind a manifest or errors row, and
for matching labels keyed by ``source`` to scans. It never goes into a store.

A leaf module: it imports nothing of fmct but the config error it raises.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from fmct.errors import ConfigError, one_line
from fmct.log import logger

KEY_ENV = "FMCT_KEY_FILE"
DEFAULT_KEY_FILE = "~/.config/fmct/pseudonym.key"
PSEUDONYM_HEX_DIGITS = 16  # 64 bits: collisions among a million scans have odds of about 3e-8
_KEY_BYTES = 32
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
# An absolute path (POSIX, ~ or Windows) standing on its own: not the "/scout" of "localizer/scout".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:~?/|[A-Za-z]:\\)[^\s'\"]+")


@dataclass(frozen=True)
class PseudonymKey:
    """A loaded key: ``secret`` (32 bytes) and the ``path`` of its file."""

    secret: bytes
    path: Path

    @property
    def fingerprint(self) -> str:
        """16 hex digits that tell keys apart; SHA-256 of the key, so the key cannot be found from it."""
        return hashlib.sha256(b"fmct pseudonym key fingerprint\x00" + self.secret).hexdigest()[:16]

    def pseudonym(self, kind: str, value: str) -> str:
        """HMAC-SHA256 of ``value`` (stripped) under this key, as 16 hex digits; ``kind`` separates name
        spaces ("patient", "study", "series", "source"), so a UID and a path never share a pseudonym."""
        message = f"{kind}\x00{str(value).strip()}".encode("utf-8")
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_DIGITS]

    @property
    def source_map_path(self) -> Path:
        """The local map pseudonym -> real path, beside the key (never in a store)."""
        return self.path.with_name(self.path.name + ".sources.jsonl")

    def record_sources(self, sources: dict[str, str]) -> None:
        """Add ``{pseudonym: real path}`` entries not yet in the local source map (owner-only file)."""
        known = self.read_sources()
        new = {name: path for name, path in sources.items() if known.get(name) != path}
        if not new:
            return
        lines = "".join(json.dumps({"pseudonym": name, "source": path}) + "\n" for name, path in sorted(new.items()))
        fd = os.open(self.source_map_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:  # one write per call: lines stay whole
            handle.write(lines)

    def read_sources(self) -> dict[str, str]:
        """The local source map as {pseudonym: real path}; empty when there is none."""
        return _read_source_map(self.source_map_path)


def local_sources(key_file: str | os.PathLike | None = None) -> dict[str, str]:
    """The local source map beside the key at ``key_file_path(key_file)`` as {pseudonym: real path};
    empty where there is none (a store received without its key). The key itself is not read."""
    path = key_file_path(key_file)
    return _read_source_map(path.with_name(path.name + ".sources.jsonl"))


def patient_pseudonyms(patient_ids: list[str]) -> list[str]:
    """Keyed pseudonyms of a labels file's patient IDs, as ingest makes them from PatientID ("" stays
    ""): under the same key, a label's patient and a scan's ``patient_key`` agree. The key is loaded
    (or made) only when some ID is given."""
    if not any(str(patient).strip() for patient in patient_ids):
        return ["" for _ in patient_ids]
    key = load_key()
    return [key.pseudonym("patient", patient) if str(patient).strip() else "" for patient in patient_ids]


def _read_source_map(path: Path) -> dict[str, str]:
    """{pseudonym: real path} from a source map file; a line cut by a killed run is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    sources = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            sources[entry["pseudonym"]] = entry["source"]
        except (ValueError, KeyError, TypeError):
            continue
    return sources


def key_file_path(given: str | os.PathLike | None = None) -> Path:
    """Where the key lies: ``given``, else ``$FMCT_KEY_FILE``, else ``~/.config/fmct/pseudonym.key``."""
    return Path(os.path.expanduser(str(given or os.environ.get(KEY_ENV) or DEFAULT_KEY_FILE))).absolute()


def load_key(path: str | os.PathLike | None = None, create: bool = True, outside: Path | None = None) -> PseudonymKey:
    """The pseudonym key at ``key_file_path(path)``; with ``create``, a new random one when it does not exist.

    Raises ConfigError (one line) for a key file inside the folder ``outside`` (the store it would travel
    with), readable by group or others, or not holding 64 hex digits; or, without ``create``, a missing one.
    """
    path = key_file_path(path)
    if outside is not None and _inside(path, outside):
        raise ConfigError(
            f"{path}: the pseudonym key lies inside the store {outside}; keep it outside, "
            "so that it never travels with the data"
        )
    if not path.exists():
        if not create:
            raise ConfigError(
                f"{path}: no pseudonym key here (give the key the store was made with: --key FILE or ${KEY_ENV})"
            )
        _create_key_file(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path}: the pseudonym key is readable by others (mode {mode:04o}); run chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path}: not an fmct pseudonym key ({type(error).__name__})") from None
    if len(secret) != _KEY_BYTES:
        raise ConfigError(f"{path}: not an fmct pseudonym key (expected {2 * _KEY_BYTES} hex digits)")
    return PseudonymKey(secret=secret, path=path)


def _create_key_file(path: Path) -> None:
    """Write a new random key, owner-only, without ever replacing a key another process just made."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(_KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)  # fails when another process made the key first: theirs is kept
        except FileExistsError:
            return
    finally:
        temporary.unlink(missing_ok=True)
    logger.warning(
        f"fmct: made a new pseudonym key {path} (owner-only). Keep it and never share it: with it, the same "
        f"patient gets the same key in every store; without it, nobody can recompute a store's keys."
    )


def _inside(path: Path, folder: Path) -> bool:
    folder = Path(os.path.abspath(folder))
    return folder == path or folder in Path(os.path.abspath(path)).parents


def scrubbed(text: str) -> str:
    """``text`` with anything that looks like a DICOM UID or an absolute path replaced, for messages
    from third-party code (a decoder's, nibabel's) that go into a store."""
    return _ABSOLUTE_PATH.sub("<path>", _UID.sub("<uid>", text))


def scrubbed_reason(error: BaseException) -> str:
    """The first line of a third-party exception's message, without UIDs or absolute paths, shortened:
    what a one-line reason in a store may say of it."""
    return scrubbed(one_line(error, limit=1000))[:200]
