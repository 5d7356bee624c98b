"""Read the two sides of an audit (training data, generated outputs) and work out what they are.

Modalities and the files that hold them:

- ``sequences``: token sequences of any length — Parquet or jsonl with a ``tokens`` list column, or a
  text file whose lines are integers separated by spaces (the protomem string format).
- ``text``: plain text — a ``.txt`` file with one document per line, a folder of ``.txt`` files (one
  document each), or Parquet / jsonl with a ``text`` column.
- ``images``: a folder of PNG/JPEG (any size, grey or colour), or one ``.npy`` / ``.npz`` array of shape
  (N, H, W) or (N, H, W, C) with C in {1, 3, 4}: uint8 (0..255) or float in [0, 1] (or [-1, 1]).

Images become float32 (N, H, W, C) in [0, 1]; grey and colour mix by promoting grey to RGB; an alpha
channel is dropped. Different sizes are an error unless ``resize`` is given (then every image is
resized, bilinear, to the training set's first image size).

Sequences and documents are read one at a time (:func:`iter_sequences`, :func:`iter_documents`, grouped
by :func:`batches`; Parquet 1,024 rows at a time), so a file of outputs can be audited
without holding it in memory; :func:`count_sequences` / :func:`count_documents` give the totals cheaply.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from protomem import limits
from protomem.errors import ProtomemError
from protomem.io import jsonl_objects, jsonl_records

MODALITIES = ("sequences", "text", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
T = TypeVar("T")


def detect_modality(path: str | Path) -> str:
    """'sequences', 'text' or 'images' from the file (or folder) itself; ProtomemError if unclear."""
    path = Path(path)
    if not path.exists():
        raise ProtomemError("no such file or folder", path=path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ProtomemError("empty folder", path=path)
        suffixes = {p.suffix.lower() for p in files}
        if suffixes & set(IMAGE_SUFFIXES):
            return "images"
        if ".txt" in suffixes:
            return "text"
        raise ProtomemError(
            f"folder holds neither images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) nor .txt files", path=path
        )
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES or suffix in IMAGE_SUFFIXES:
        return "images"
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None
        if "tokens" in names:
            return "sequences"
        if "text" in names:
            return "text"
        raise ProtomemError("Parquet file has neither a 'tokens' nor a 'text' column", path=path)
    if suffix in (".jsonl", ".json", ".ndjson"):
        for number, record in jsonl_objects(path):  # the first record decides
            if isinstance(record, dict) and "tokens" in record:
                return "sequences"
            if isinstance(record, dict) and "text" in record:
                return "text"
            raise ProtomemError(
                "expected objects with a 'tokens' or a 'text' field", path=path, where=f"line {number}"
            )
        raise ProtomemError("empty file", path=path)
    if suffix in (".txt", ".text", ".tokens", ""):
        seen = 0
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split()
                if not words:
                    continue
                seen += 1
                if not all(w.lstrip("-").isdigit() for w in words):
                    return "text"
                if seen >= 200:
                    break
        if seen == 0:
            raise ProtomemError("empty file", path=path)
        return "sequences"
    raise ProtomemError(f"cannot tell what {suffix!r} files hold; pass --modality", path=path)


# ----------------------------------------------------------------------------------------------- sequences


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json", ".ndjson")


def _parquet_column(path: Path, column: str, rows_per_batch: int = 1024) -> Iterator[tuple[int, object]]:
    """(1-based row, value) of one Parquet column, read ``rows_per_batch`` rows at a time."""
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> ProtomemError:
        return ProtomemError(f"not a readable Parquet file with a {column!r} column ({exc})", path=path)

    try:
        parts = pq.ParquetFile(path).iter_batches(batch_size=rows_per_batch, columns=[column])
        number = 0
        for part in parts:
            for value in part.column(0).to_pylist():
                number += 1
                yield number, value
    except ProtomemError:
        raise
    except Exception as exc:  # pyarrow raises several types for a corrupt file or a missing column
        raise unreadable(exc) from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending) for every non-blank line of a UTF-8 file.

    Decoded line by line, so a byte that is not UTF-8 is an error naming its line.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtomemError(
                    f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)",
                    path=path,
                    where=f"line {number}",
                ) from None
            if line.strip():
                yield number, line.rstrip("\r\n")


def _non_blank_lines(path: Path) -> int:
    """Number of non-blank lines, counted on the raw bytes (cheap; for a progress bar's total)."""
    with open(path, "rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:
        raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None


def iter_sequences(path: str | Path) -> Iterator[np.ndarray]:
    """Token sequences one by one: (n_i,) int64 arrays, validated (an error names the line or row).

    Raises ProtomemError("no sequences in file") at the end if the file held none.
    """
    path = Path(path)
    unit = "line"
    if _is_parquet(path):
        unit = "row"
        rows = _parquet_column(path, "tokens")
    elif _is_jsonl(path):
        rows = ((number, record["tokens"]) for number, record in jsonl_records(path, "tokens", list))
    else:
        rows = ((number, line.split()) for number, line in _text_lines(path))
    seen = 0
    for number, row in rows:
        if row is None or len(row) == 0:
            raise ProtomemError("empty sequence", path=path, where=f"{unit} {number}")
        limits.STRING_TOKENS.check(len(row), "sequence", path=path, where=f"{unit} {number}")
        try:
            values = [int(t) if not isinstance(t, (bool, float)) else _bad_token(t) for t in row]
            array = np.asarray(values, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise ProtomemError(
                "tokens must be integers in [0, 2^63)", path=path, where=f"{unit} {number}"
            ) from None
        if (array < 0).any():
            raise ProtomemError("negative token", path=path, where=f"{unit} {number}")
        seen += 1
        yield array
    if seen == 0:
        raise ProtomemError("no sequences in file", path=path)


def read_sequences(path: str | Path) -> list[np.ndarray]:
    """Every token sequence of a file (see :func:`iter_sequences`)."""
    return list(iter_sequences(path))


def count_sequences(path: str | Path) -> int:
    """How many sequences :func:`iter_sequences` will yield (Parquet: rows; else non-blank lines).

    Cheap (metadata or one pass over the bytes, nothing parsed): for a progress bar's total.
    """
    path = Path(path)
    return _parquet_rows(path) if _is_parquet(path) else _non_blank_lines(path)


def _bad_token(value: object) -> int:
    raise ValueError(value)


def batches(items: Iterable[T], size: int) -> Iterator[tuple[int, list[T]]]:
    """(start, items[start : start + size]) for consecutive batches of an iterable, read lazily."""
    iterator = iter(items)
    start = 0
    while batch := list(islice(iterator, size)):
        yield start, batch
        start += len(batch)


# ---------------------------------------------------------------------------------------------------- text


def _text_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt")


def iter_documents(path: str | Path) -> Iterator[str]:
    """Plain-text documents one by one: one per line of a .txt file, one per .txt file in a folder, or a
    ``text`` column of Parquet / jsonl. Raises ProtomemError("no documents") at the end if there were none,
    and names the document whose whitespace tokens exceed :data:`protomem.limits.STRING_TOKENS`.
    """
    path = Path(path)
    seen = 0
    for file, where, document in _located_documents(path):
        limits.STRING_TOKENS.check(len(document.split()), "document", path=file, where=where)
        seen += 1
        yield document
    if seen == 0:
        raise ProtomemError("no documents", path=path)


def _located_documents(path: Path) -> Iterator[tuple[Path, str | None, str]]:
    """(file, line or row or None, document) for every document of :func:`iter_documents`."""
    if path.is_dir():
        for file in _text_files(path):
            try:
                document = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ProtomemError(f"unreadable text file ({exc})", path=file) from None
            yield file, None, document
    elif _is_parquet(path):
        for number, document in _parquet_column(path, "text"):
            if document is not None and not isinstance(document, str):
                raise ProtomemError("the 'text' column must hold strings", path=path, where=f"row {number}")
            yield path, f"row {number}", document or ""
    elif _is_jsonl(path):
        for number, record in jsonl_records(path, "text", str):
            yield path, f"line {number}", record["text"]
    else:
        for number, line in _text_lines(path):
            yield path, f"line {number}", line


def read_documents(path: str | Path) -> list[str]:
    """Every document of a file or folder (see :func:`iter_documents`)."""
    return list(iter_documents(path))


def count_documents(path: str | Path) -> int:
    """How many documents :func:`iter_documents` will yield (folder: .txt files; Parquet: rows; else
    non-blank lines). Cheap: for a progress bar's total.
    """
    path = Path(path)
    if path.is_dir():
        return len(_text_files(path))
    return _parquet_rows(path) if _is_parquet(path) else _non_blank_lines(path)


# -------------------------------------------------------------------------------------------------- images


def _value_range(array: np.ndarray, path: Path, chunk: int = 4096) -> tuple[float, float]:
    """(min, max) of a whole (possibly memory-mapped) array, read in chunks; rejects NaN / infinity."""
    low, high = np.inf, -np.inf
    for start in range(0, array.shape[0], chunk):
        part = np.asarray(array[start : start + chunk])
        if np.issubdtype(part.dtype, np.floating) and not np.isfinite(part).all():
            raise ProtomemError("pixels contain NaN or infinity", path=path, where=f"image {start}+")
        if part.size:
            low, high = min(low, float(part.min())), max(high, float(part.max()))
    return (0.0, 1.0) if low > high else (low, high)


def _pixel_scale(array: np.ndarray, path: Path) -> tuple[float, float]:
    """(offset, scale) with unit = (pixels + offset) * scale in [0, 1], decided once for the whole array.

    uint8 and other integers 0..255: / 255; floats in [0, 1]: kept; floats in [-1, 1]: (x + 1) / 2.
    """
    if array.dtype == np.uint8:
        return 0.0, 1 / 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ProtomemError(f"unsupported pixel dtype {array.dtype}", path=path)
    low, high = _value_range(array, path)
    if np.issubdtype(array.dtype, np.integer):
        if low < 0 or high > 255:
            raise ProtomemError("integer pixels must lie in 0..255", path=path)
        return 0.0, 1 / 255
    if low >= 0 and high <= 1:
        return 0.0, 1.0
    if low >= -1 and high <= 1:
        return 1.0, 0.5
    raise ProtomemError(f"float pixels must lie in [0, 1] or [-1, 1], found [{low:g}, {high:g}]", path=path)


def _to_unit_float(array: np.ndarray, path: Path, scale: tuple[float, float] | None = None) -> np.ndarray:
    """Pixel values -> float32 in [0, 1] with the array's (offset, scale) (decided here if not given)."""
    offset, factor = scale if scale is not None else _pixel_scale(array, path)
    return ((array.astype(np.float32) + offset) * factor).astype(np.float32)


def _with_channels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        return array[..., None]
    if array.ndim == 4 and array.shape[-1] in (1, 3, 4):
        return array[..., :3] if array.shape[-1] == 4 else array
    raise ProtomemError(f"expected images of shape (N, H, W) or (N, H, W, C), got {array.shape}", path=path)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> (size[0], size[1], C), bilinear."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(image[..., c]).resize((size[1], size[0]), Image.BILINEAR))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


@dataclass
class ImageSource:
    """Images from a folder or an array file, read lazily in batches.

    Attributes:
        path: the folder or file; files: the image files (folder input) or None; count: number of images.
        shape: (H, W, C) of the images as they come out of :meth:`batches` (after resize / promotion).
    """

    path: Path
    files: list[Path] | None
    count: int
    native_shapes: set[tuple[int, int, int]] = field(default_factory=set)
    shape: tuple[int, int, int] = (0, 0, 0)
    _array: np.ndarray | None = None
    _scale: tuple[float, float] | None = None

    def conform(self, shape: tuple[int, int, int] | None, resize: bool) -> None:
        """Fix the output shape: ``shape`` (H, W, C) to match another source, or this source's own."""
        sizes = {s[:2] for s in self.native_shapes}
        channels = max(s[2] for s in self.native_shapes)
        if shape is None:
            if len(sizes) > 1 and not resize:
                raise ProtomemError(
                    f"images have different sizes {sorted(sizes)[:3]}... (pass --resize)",
                    path=self._first_odd(),
                )
            size = next(iter(sorted(sizes))) if len(sizes) == 1 else self._first_size()
            self.shape = (size[0], size[1], channels)
            return
        if (len(sizes) > 1 or next(iter(sizes)) != shape[:2]) and not resize:
            raise ProtomemError(
                f"images are {sorted(sizes)[0][0]}x{sorted(sizes)[0][1]}, the training images "
                f"{shape[0]}x{shape[1]} (pass --resize)",
                path=self.path,
            )
        self.shape = (shape[0], shape[1], max(channels, shape[2]))

    def _first_size(self) -> tuple[int, int]:
        if self._array is not None:
            return tuple(self._array.shape[1:3])
        return _peek_shape(self.files[0])[:2]

    def _first_odd(self) -> Path:
        if self.files is None:
            return self.path
        first = _peek_shape(self.files[0])[:2]
        for file in self.files:
            if _peek_shape(file)[:2] != first:
                return file
        return self.path

    def _finish(self, image: np.ndarray) -> np.ndarray:
        if image.shape[:2] != self.shape[:2]:
            image = _resize(image, self.shape[:2])
        if image.shape[2] == 1 and self.shape[2] == 3:
            image = np.repeat(image, 3, axis=2)
        return image

    def read(self, indices: np.ndarray | range) -> np.ndarray:
        """(len(indices), H, W, C) float32 in [0, 1]."""
        if self._array is not None:
            raw = _with_channels(np.asarray(self._array[np.asarray(indices, dtype=np.int64)]), self.path)
            images = _to_unit_float(raw, self.path, self._scale)
            if images.shape[1:] == self.shape:
                return images
            return np.stack([self._finish(img) for img in images]) if len(images) else images
        out = np.zeros((len(indices), *self.shape), dtype=np.float32)
        for row, i in enumerate(indices):
            out[row] = self._finish(_read_image_file(self.files[int(i)]))
        return out

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images) for consecutive batches of at most ``batch_size`` images."""
        for start in range(0, self.count, batch_size):
            yield start, self.read(range(start, min(self.count, start + batch_size)))

    def name(self, i: int) -> str:
        return self.files[i].name if self.files is not None else f"{self.path.name}[{i}]"


def _read_image_file(file: Path) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C = 1 (grey) or 3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            _check_pixels(img.width, img.height, file)  # on the header, before decoding
            img.load()
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            converted = img.convert(mode)
            array = np.asarray(converted, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, file) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ProtomemError(f"unreadable image ({exc.__class__.__name__})", path=file) from None
    return _to_unit_float(_with_channels(array[None], file)[0], file)


def _peek_shape(file: Path) -> tuple[int, int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            grey = img.mode in ("1", "L", "I", "I;16", "F", "LA")
            shape = (img.height, img.width, 1 if grey else 3)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, file) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ProtomemError(f"unreadable image ({exc.__class__.__name__})", path=file) from None
    _check_pixels(shape[1], shape[0], file)
    return shape


def _bomb(exc: Exception, file: Path) -> ProtomemError:
    """Pillow refuses headers declaring ~179M pixels or more before protomem sees the size."""
    return ProtomemError(f"image too large for Pillow ({' '.join(str(exc).split())})", path=file)


def _check_pixels(width: int, height: int, path: Path) -> None:
    """Refuse images larger than :data:`protomem.limits.IMAGE_PIXELS` (before any is decoded)."""
    limits.IMAGE_PIXELS.check(width * height, f"{width}x{height} pixels per image", path=path)


def open_images(path: str | Path) -> ImageSource:
    """An :class:`ImageSource` for a folder of image files or a .npy / .npz array (checked, not yet read)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ProtomemError("no image files in folder", path=path)
        others = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p not in files]
        if others:
            raise ProtomemError("not an image file (the folder mixes images and other files)", path=others[0])
        shapes = {_peek_shape(f) for f in files}
        return ImageSource(path=path, files=files, count=len(files), native_shapes=shapes)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource(path=path.parent, files=[path], count=1, native_shapes={_peek_shape(path)})
    try:
        if path.suffix.lower() == ".npz":
            archive = np.load(path, allow_pickle=False)
            if not archive.files:
                raise ProtomemError("empty .npz archive", path=path)
            key = "images" if "images" in archive.files else archive.files[0]
            array = archive[key]
        else:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ProtomemError:
        raise
    except Exception as exc:  # numpy raises many types for a damaged file (EOFError, TokenError, ...)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ProtomemError(f"unreadable array file ({detail})", path=path) from None
    array = _with_channels(array, path) if array.ndim in (3, 4) else _with_channels(array, path)
    if array.shape[0] == 0:
        raise ProtomemError("no images in array", path=path)
    _check_pixels(int(array.shape[2]), int(array.shape[1]), path)
    channels = array.shape[-1]
    return ImageSource(
        path=path,
        files=None,
        count=int(array.shape[0]),
        native_shapes={(int(array.shape[1]), int(array.shape[2]), int(channels))},
        _array=array,
        _scale=_pixel_scale(array, path),
    )


def image_bytes_keys(images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(N, H*W*C) uint8: pixels quantized to 8 bits, one row per image (exact-duplicate search).

    Built in chunks so the float temporaries stay at ``chunk`` images.
    """
    images = np.asarray(images)
    out = np.empty((len(images), int(np.prod(images.shape[1:]))), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].reshape(-1, out.shape[1])
        out[start : start + chunk] = np.rint(part * np.float32(255)).astype(np.uint8)
    return out
