"""The files one int16 HU volume is stored in: blosc2-compressed (``.b2nd``) or raw NumPy (``.npy``).

A compressed volume is a blosc2 NDArray frame: it records its own shape, dtype, codec and filters, so
reading needs no configuration, and any blosc2 reader (``blosc2.open(path)[:]``) opens it. The volume
is one chunk, cut into blocks of whole (y, z) planes, so the chunk's decompressed bytes are the volume
in C order and decode straight into a caller's buffer. A leaf module: numpy, blosc2 and fmct.atomic.

Codecs (figures: benchmarks/loader.py on synthetic 128^3 heads, one core; BENCHMARKS.md has the run):

- ``lz4hc``: LZ4 high-compression, level 5, byte shuffle. The default: about 2.7x smaller, about 400
  volumes/s decoded per core (twice zstd); compressing costs about 0.1 s per volume, once, at ingest.
- ``zstd``: Zstandard, level 3, byte shuffle: the smallest (about 3.0x), about 170 volumes/s per core.
- ``lz4``: LZ4, byte shuffle: the fastest to write (about 0.01 s per volume) and as fast to decode as
  lz4hc, but only about 2.1x smaller.
- ``npy``: no compression (the format of stores written before compression), memory-mapped reads.

A store is read far more often than written (every epoch of every run), so the default is the codec
that decodes fastest while still more than halving the disk. Byte shuffle beat bit shuffle on these
volumes with every codec (the high bytes of HU values repeat, the low ones carry the noise).

Every codec is lossless: a decoded volume equals the written one bit for bit.
"""

from __future__ import annotations

import io
from pathlib import Path

import blosc2
import numpy as np

from fmct.atomic import atomic_write_bytes
from fmct.errors import ConfigError

# blosc2 parameters of each compressed codec. Compression and decompression run on one thread: the
# parallelism is the caller's (ingest workers, loader processes, reader threads), one volume per core.
BLOSC2_CODECS: dict[str, dict] = {
    "lz4hc": dict(codec=blosc2.Codec.LZ4HC, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1),
    "zstd": dict(codec=blosc2.Codec.ZSTD, clevel=3, filters=[blosc2.Filter.SHUFFLE], nthreads=1),
    "lz4": dict(codec=blosc2.Codec.LZ4, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1),
}
CODECS: tuple[str, ...] = (*BLOSC2_CODECS, "npy")
DEFAULT_CODEC = "lz4hc"
SUFFIXES: dict[str, str] = {**{name: ".b2nd" for name in BLOSC2_CODECS}, "npy": ".npy"}
NPY_MAGIC = b"\x93NUMPY"
BLOCK_BYTES = 512 * 1024  # 16 planes of 128^2 int16: smaller blocks compressed less, at no gain in speed

# Decompression releases the GIL, so reader threads (fmct embed, finetune, the shard stream) decode in
# parallel. A process-wide blosc2 setting; it only costs time on buffers far smaller than a volume.
blosc2.set_releasegil(True)


def check_codec(codec: str) -> str:
    """``codec`` itself when it is one of :data:`CODECS`; :class:`ConfigError` otherwise."""
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    return codec


def encode(hu: np.ndarray, codec: str) -> bytes:
    """The bytes of the volume file of ``hu`` (int16 HU in the store; any shape) in ``codec``."""
    hu = np.ascontiguousarray(hu)
    if check_codec(codec) == "npy":
        buffer = io.BytesIO()
        np.save(buffer, hu, allow_pickle=False)
        return buffer.getvalue()
    return compress(hu, BLOSC2_CODECS[codec])


def compress(hu: np.ndarray, cparams: dict) -> bytes:
    """The ``.b2nd`` frame of ``hu`` compressed with blosc2 ``cparams``, in the layout :func:`decode` reads
    fastest (one chunk, blocks of whole planes). For measuring other parameters; the store uses :func:`encode`."""
    hu = np.ascontiguousarray(hu)
    return blosc2.asarray(hu, chunks=hu.shape, blocks=_blocks(hu.shape, hu.itemsize), cparams=cparams).to_cframe()


def decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """The volume in the bytes of a volume file (``.b2nd`` or ``.npy``), into ``out`` when given.

    Raises ValueError for bytes that are not a whole volume file, or hold a volume that does not fit ``out``.
    """
    if data[:6] == NPY_MAGIC:
        return _fill(out, np.load(io.BytesIO(data), allow_pickle=False))
    try:
        array = blosc2.ndarray_from_cframe(data)
    except RuntimeError as error:  # blosc2's word for a damaged or truncated frame
        raise ValueError(f"not a volume file ({error})") from None
    if out is None:
        out = np.empty(array.shape, array.dtype)
    _check_fits(out, array)
    chunk = array.schunk.get_chunk(0) if array.schunk.nchunks == 1 else None
    if chunk is not None and blosc2.get_cbuffer_sizes(chunk)[0] == out.nbytes and out.flags.c_contiguous:
        blosc2.decompress2(chunk, dst=out, nthreads=1)  # one chunk of whole planes: its bytes in C order
    else:  # a frame of another layout (not written by fmct)
        out[...] = array[...]
    return out


def codec_of(data: bytes) -> str:
    """The name in :data:`CODECS` of the codec the bytes of a volume file were written in ('' for another)."""
    if data[:6] == NPY_MAGIC:
        return "npy"
    try:
        cparams = blosc2.ndarray_from_cframe(data).cparams
    except RuntimeError as error:
        raise ValueError(f"not a volume file ({error})") from None
    filters = [f for f in cparams.filters if f != blosc2.Filter.NOFILTER]
    for name, params in BLOSC2_CODECS.items():
        if (cparams.codec, cparams.clevel, filters) == (params["codec"], params["clevel"], params["filters"]):
            return name
    return ""


def write_volume(path_stem: Path, hu: np.ndarray, codec: str) -> Path:
    """Write ``hu`` atomically to ``path_stem`` + the codec's suffix; return the file's path."""
    path = Path(path_stem).with_name(Path(path_stem).name + SUFFIXES[check_codec(codec)])
    atomic_write_bytes(path, encode(hu, codec))
    return path


def read_volume(path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """The volume in the file ``path`` (``.b2nd``, or ``.npy``: memory-mapped), into ``out`` when given.

    Raises OSError for a file that cannot be read and ValueError for one that is not a volume file or
    does not fit ``out``.
    """
    path = Path(path)
    if path.suffix != ".npy":
        return decode(path.read_bytes(), out)
    return _fill(out, np.load(path, mmap_mode="r", allow_pickle=False))


def _fill(out: np.ndarray | None, array: np.ndarray) -> np.ndarray:
    """``array`` copied into ``out``, or into memory of its own when ``out`` is None."""
    if out is None:
        return np.array(array)  # also out of a memory map, into memory the caller owns
    _check_fits(out, array)
    np.copyto(out, array)
    return out


def _check_fits(out: np.ndarray, array) -> None:
    if out.shape != tuple(array.shape) or out.dtype != array.dtype:
        raise ValueError(f"holds {array.dtype} {list(array.shape)}, expected {out.dtype} {list(out.shape)}")


def _blocks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Blocks of whole trailing planes, as many planes as fit BLOCK_BYTES and divide the first axis."""
    plane = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    rows = max(1, min(shape[0], BLOCK_BYTES // max(plane, 1)))
    while shape[0] % rows:  # the chunk holds no padding, so its bytes are the volume's, in order
        rows -= 1
    return (rows, *shape[1:])
