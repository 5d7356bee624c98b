"""Read the two sides of an audit (training data, generated outputs) and work out what they are.

Modalities and the files that hold them:

- ``sequences``: token sequences of any length — Parquet or jsonl with a ``tokens`` list column, or a
  text file whose lines are integers separated by spaces (the protomem string format).
- ``text``: plain text — a ``.txt`` file with one document per line, a folder of ``.txt`` files (one
  document each), or Parquet / jsonl with a ``text`` column.
- ``images``: a folder of PNG/JPEG (any size, grey or colour), or one ``.npy`` / ``.npz`` array of shape
  (N, H, W) or (N, H, W, C) with C in {1, 3, 4}: uint8 (0..255) or float in [0, 1] (or [-1, 1]). An
  ``.npz`` with several arrays needs the name of one: ``file.npz:key``.

Numbering and sources. Items are numbered in file order: every line of a text file is an item (a blank
line is an empty document, which matches nothing; in a token file it is an error), except blank lines
at the very end; folders are read in natural order (``2.png`` before ``10.png``). Every item has a
*source*, the label written to the audit's tables: the file name (folders), ``line N`` (text, jsonl;
1-based), ``row N`` (Parquet; 1-based) or ``index i`` (arrays; 0-based).

Limits, checked before anything is allocated: an image may declare at most ``max_pixels`` pixels
(:data:`protomem.limits.IMAGE_PIXELS`, raised with ``--max-image-pixels`` or
``PROTOMEM_MAX_IMAGE_PIXELS``; read from the file's header, never decoded first), and the training
images must fit in the memory available (:func:`require_memory`).

Images become float32 (N, H, W, C) in [0, 1]; grey and colour mix by promoting grey to RGB; an alpha
channel is dropped. Different sizes are an error unless ``resize`` is given (then every image is
resized, bilinear, to the training set's first image size).

Sequences and documents are read one at a time (:func:`iter_sequences`, :func:`iter_documents`, grouped
by :func:`batches`; Parquet 1,024 rows at a time), so a file of outputs can be audited
without holding it in memory; :func:`count_sequences` / :func:`count_documents` give the totals cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from protomem import limits
from protomem.errors import ProtomemError
from protomem.io import ARRAY_FILE_ERRORS, jsonl_objects, jsonl_records
from protomem.textio import text_lines

MODALITIES = ("sequences", "text", "images")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
T = TypeVar("T")


def natural_key(name: str) -> tuple:
    """Sort key putting ``2.png`` before ``10.png``: digit runs compare as numbers, the rest case-blind."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


def split_array_key(path: str | Path) -> tuple[Path, str | None]:
    """``file.npz:key`` -> (file.npz, "key"); any other path -> (path, None)."""
    path = Path(path)
    if not path.exists() and ":" in path.name:
        file, key = str(path).rsplit(":", 1)
        if Path(file).suffix.lower() == ".npz" and key:
            return Path(file), key
    return path, None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_memory(nbytes: int, what: str, path: str | Path) -> None:
    """ProtomemError naming ``path`` when ``nbytes`` exceed the memory available (check before allocating)."""
    free = available_memory()
    if free is not None and nbytes > free:
        raise ProtomemError(
            f"{what} need {nbytes / 2**30:,.1f} GiB of memory, more than the {free / 2**30:,.1f} GiB "
            "available",
            path=path,
        )


def detect_modality(path: str | Path) -> str:
    """'sequences', 'text' or 'images' from the file (or folder) itself; ProtomemError if unclear."""
    path, key = split_array_key(path)
    if key is not None:
        if not path.exists():
            raise ProtomemError("no such file", path=path)
        return "images"
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


def _check_column_type(path: Path, column: str) -> None:
    """The Parquet column must be a list of integers (``tokens``) or strings (``text``): else an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None
    if column not in schema.names:
        raise ProtomemError(f"no {column!r} column", path=path)
    kind = schema.field(column).type
    if column == "tokens":
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        ok, expected = is_list and pa.types.is_integer(kind.value_type), "a list of integers"
    else:
        ok = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
        expected = "strings"
    if not ok:
        raise ProtomemError(f"column {column!r} holds {kind}, expected {expected}", path=path)


def _parquet_column(path: Path, column: str, rows_per_batch: int = 1024) -> Iterator[tuple[int, object]]:
    """(1-based row, value) of one Parquet column, read ``rows_per_batch`` rows at a time."""
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> ProtomemError:
        return ProtomemError(f"not a readable Parquet file with a {column!r} column ({exc})", path=path)

    _check_column_type(path, column)
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
    """(1-based line number, line without its line ending) for every line of a UTF-8 file up to its last
    non-blank line (blank lines in between are yielded too, so numbering never shifts).

    Decoded line by line, so a byte that is not UTF-8 is an error naming its line.
    """
    pending: list[tuple[int, str]] = []  # blank lines held back until a non-blank one follows
    for number, line in text_lines(path):
        if not line.strip():
            pending.append((number, line.rstrip("\r\n")))
            continue
        yield from pending
        pending.clear()
        yield number, line.rstrip("\r\n")


def _item_lines(path: Path) -> int:
    """Number of lines :func:`_text_lines` yields (up to the last non-blank one), counted on the raw bytes
    (cheap; for a progress bar's total)."""
    last = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                last = number
    return last


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:
        raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None


def labelled_sequences(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(source, tokens) for every token sequence of a file: tokens as (n_i,) int64, validated (an error
    names the line or row). A blank line inside a text file is an error (an empty sequence).

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
        where = f"{unit} {number}"
        if row is None or len(row) == 0:
            raise ProtomemError("empty sequence", path=path, where=where)
        limits.STRING_TOKENS.check(len(row), "sequence", path=path, where=where)
        try:
            values = [int(t) if not isinstance(t, (bool, float)) else _bad_token(t) for t in row]
        except (ValueError, TypeError):
            raise ProtomemError("tokens must be integers", path=path, where=where) from None
        try:
            array = np.asarray(values, dtype=np.int64)
        except OverflowError:
            raise ProtomemError(
                "token too large (tokens must be below 2^63)", path=path, where=where
            ) from None
        if (array < 0).any():
            raise ProtomemError("negative token", path=path, where=where)
        seen += 1
        yield where, array
    if seen == 0:
        raise ProtomemError("no sequences in file", path=path)


def iter_sequences(path: str | Path) -> Iterator[np.ndarray]:
    """Token sequences one by one (see :func:`labelled_sequences`)."""
    return (tokens for _, tokens in labelled_sequences(path))


def read_sequences(path: str | Path) -> list[np.ndarray]:
    """Every token sequence of a file (see :func:`labelled_sequences`)."""
    return list(iter_sequences(path))


def count_sequences(path: str | Path) -> int:
    """How many sequences :func:`iter_sequences` will yield (Parquet: rows; else lines up to the last
    non-blank one). Cheap (metadata or one pass over the bytes, nothing parsed): for a progress bar's total.
    """
    path = Path(path)
    if _is_parquet(path):
        return _parquet_rows(path)
    if _is_jsonl(path):
        return _non_blank_lines(path)
    return _item_lines(path)


def _non_blank_lines(path: Path) -> int:
    """Number of non-blank lines, counted on the raw bytes (jsonl: one record each)."""
    with open(path, "rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def unzip_labelled(pairs: Iterable[tuple[str, T]]) -> tuple[list[str], list[T]]:
    """(sources, items) from (source, item) pairs."""
    sources: list[str] = []
    items: list[T] = []
    for source, item in pairs:
        sources.append(source)
        items.append(item)
    return sources, items


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
    return sorted(
        (p for p in path.iterdir() if p.suffix.lower() == ".txt"), key=lambda p: natural_key(p.name)
    )


def labelled_documents(path: str | Path) -> Iterator[tuple[str, str]]:
    """(source, document) for every plain-text document: one per line of a .txt file (a blank line is an
    empty document), one per .txt file in a folder (natural order), or a ``text`` column of Parquet /
    jsonl (a null is an empty document). Raises ProtomemError("no documents") at the end if there were
    none, and names the document whose whitespace tokens exceed :data:`protomem.limits.STRING_TOKENS`.
    """
    path = Path(path)
    seen = 0
    for file, source, document in _located_documents(path):
        where = None if file != path else source
        limits.STRING_TOKENS.check(len(document.split()), "document", path=file, where=where)
        seen += 1
        yield source, document
    if seen == 0:
        raise ProtomemError("no documents", path=path)


def _located_documents(path: Path) -> Iterator[tuple[Path, str, str]]:
    """(file, source label, document) for every document of :func:`labelled_documents`."""
    if path.is_dir():
        for file in _text_files(path):
            try:
                document = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ProtomemError(f"unreadable text file ({exc})", path=file) from None
            yield file, file.name, document
    elif _is_parquet(path):
        for number, document in _parquet_column(path, "text"):  # its type checked: strings or nulls
            yield path, f"row {number}", document or ""
    elif _is_jsonl(path):
        for number, record in jsonl_records(path, "text", str):
            yield path, f"line {number}", record["text"]
    else:
        for number, line in _text_lines(path):
            yield path, f"line {number}", line


def iter_documents(path: str | Path) -> Iterator[str]:
    """Plain-text documents one by one (see :func:`labelled_documents`)."""
    return (document for _, document in labelled_documents(path))


def read_documents(path: str | Path) -> list[str]:
    """Every document of a file or folder (see :func:`labelled_documents`)."""
    return list(iter_documents(path))


def count_documents(path: str | Path) -> int:
    """How many documents :func:`iter_documents` will yield (folder: .txt files; Parquet: rows; jsonl:
    records; text: lines up to the last non-blank one). Cheap: for a progress bar's total.
    """
    path = Path(path)
    if path.is_dir():
        return len(_text_files(path))
    if _is_parquet(path):
        return _parquet_rows(path)
    return _non_blank_lines(path) if _is_jsonl(path) else _item_lines(path)


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
    out = np.add(array, np.float32(offset), dtype=np.float32) if offset else array.astype(np.float32)
    out *= np.float32(factor)
    return out


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
    max_pixels: int | None = None
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
        return _peek_shape(self.files[0], self.max_pixels)[:2]

    def _first_odd(self) -> Path:
        if self.files is None:
            return self.path
        first = _peek_shape(self.files[0], self.max_pixels)[:2]
        for file in self.files:
            if _peek_shape(file, self.max_pixels)[:2] != first:
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
            if isinstance(indices, range) and indices.step == 1:  # a slice of the (memory-mapped) array
                rows = self._array[indices.start : indices.stop]
            else:
                rows = self._array[np.asarray(indices, dtype=np.int64)]
            raw = _with_channels(np.asarray(rows), self.path)
            images = _to_unit_float(raw, self.path, self._scale)
            if images.shape[1:] == self.shape:
                return images
            return np.stack([self._finish(img) for img in images]) if len(images) else images
        out = np.zeros((len(indices), *self.shape), dtype=np.float32)
        for row, i in enumerate(indices):
            out[row] = self._finish(_read_image_file(self.files[int(i)], self.max_pixels))
        return out

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images) for consecutive batches of at most ``batch_size`` images."""
        for start in range(0, self.count, batch_size):
            yield start, self.read(range(start, min(self.count, start + batch_size)))

    def source(self, i: int) -> str:
        """The label of image ``i`` in the audit's tables: its file name, or ``index i`` in an array file."""
        return self.files[i].name if self.files is not None else f"index {i}"

    def sources(self) -> list[str]:
        return [self.source(i) for i in range(self.count)]

    def require_memory(self, bytes_per_value: int, what: str) -> None:
        """Refuse (naming the input) if ``count`` images of ``shape`` at ``bytes_per_value`` do not fit."""
        values = self.count * int(np.prod(self.shape))
        require_memory(values * bytes_per_value, f"{self.count:,} {what} of {self.shape}", self.path)


def pixel_limit(max_pixels: int | None) -> int:
    """The pixels an image may declare: ``max_pixels`` if given (``--max-image-pixels``), else
    :data:`protomem.limits.IMAGE_PIXELS` (``PROTOMEM_MAX_IMAGE_PIXELS`` or its default)."""
    return int(max_pixels) if max_pixels is not None else limits.IMAGE_PIXELS.value()


def _open_image(file: Path, max_pixels: int | None):
    """A PIL image opened lazily (header only), refused if it declares more than ``max_pixels`` pixels.

    PIL's own decompression-bomb check is replaced by this one for the call, so the error names the
    declared size and the limit the user can raise.
    """
    max_pixels = pixel_limit(max_pixels)
    from PIL import Image, UnidentifiedImageError

    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        image = Image.open(file)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ProtomemError(f"unreadable image ({exc.__class__.__name__})", path=file) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    if image.width * image.height > max_pixels:
        image.close()
        raise ProtomemError(
            f"image declares {image.width}x{image.height} pixels, more than the limit of {max_pixels:,} "
            "(raise it with --max-image-pixels or PROTOMEM_MAX_IMAGE_PIXELS)",
            path=file,
        )
    return image


def _read_image_file(file: Path, max_pixels: int | None = None) -> np.ndarray:
    """(H, W, C) float32 in [0, 1], C = 1 (grey) or 3; the size is checked before decoding."""
    try:
        with _open_image(file, max_pixels) as img:
            img.load()
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            converted = img.convert(mode)
            array = np.asarray(converted, dtype=np.uint8)
    except ProtomemError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt image data
        raise ProtomemError(f"unreadable image ({exc.__class__.__name__})", path=file) from None
    return _to_unit_float(_with_channels(array[None], file)[0], file)


def _peek_shape(file: Path, max_pixels: int | None = None) -> tuple[int, int, int]:
    """(H, W, C) of an image file from its header (C = 1 grey, 3 colour), within the pixel limit."""
    with _open_image(file, max_pixels) as img:
        grey = img.mode in ("1", "L", "I", "I;16", "F", "LA")
        return (img.height, img.width, 1 if grey else 3)


def _load_array(path: Path, key: str | None) -> np.ndarray:
    """The array of a .npy (memory-mapped) or one named array of a .npz; one-line errors."""
    try:
        if path.suffix.lower() != ".npz":
            if key is not None:
                raise ProtomemError(f"only .npz archives hold named arrays (got ':{key}')", path=path)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if not names:
                raise ProtomemError("empty .npz archive", path=path)
            if key is None and len(names) > 1:
                listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise ProtomemError(
                    f"holds {len(names)} arrays ({listed}): name one, e.g. {path.name}:{names[0]}", path=path
                )
            key = names[0] if key is None else key
            if key not in names:
                raise ProtomemError(f"has no array {key!r} (it holds {', '.join(names[:6])})", path=path)
            member = archive.zip.getinfo(key + ".npy") if key + ".npy" in archive.zip.namelist() else None
            if member is not None:
                require_memory(member.file_size, f"array {key!r}", path)
            return archive[key]
    except ProtomemError:
        raise
    except ARRAY_FILE_ERRORS as exc:
        reason = " ".join((str(exc) or exc.__class__.__name__).split())[:200]
        raise ProtomemError(f"unreadable array file ({reason})", path=path) from None


def open_images(path: str | Path, max_pixels: int | None = None) -> ImageSource:
    """An :class:`ImageSource` for a folder of image files, an image file, or a .npy / .npz array
    (``file.npz:key`` names one array of an archive); checked, not yet read."""
    max_pixels = pixel_limit(max_pixels)
    path, key = split_array_key(path)
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: natural_key(p.name),
        )
        if not files:
            raise ProtomemError("no image files in folder", path=path)
        others = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p not in files]
        if others:
            raise ProtomemError("not an image file (the folder mixes images and other files)", path=others[0])
        shapes = {_peek_shape(f, max_pixels) for f in files}
        return ImageSource(
            path=path, files=files, count=len(files), native_shapes=shapes, max_pixels=max_pixels
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        shape = _peek_shape(path, max_pixels)
        return ImageSource(
            path=path.parent, files=[path], count=1, native_shapes={shape}, max_pixels=max_pixels
        )
    array = _with_channels(_load_array(path, key), path)
    if array.shape[0] == 0:
        raise ProtomemError("no images in array", path=path)
    if array.shape[1] * array.shape[2] > max_pixels:
        raise ProtomemError(
            f"images of {array.shape[1]}x{array.shape[2]} pixels, more than the limit of {max_pixels:,} "
            "(raise it with --max-image-pixels or PROTOMEM_MAX_IMAGE_PIXELS)",
            path=path,
        )
    channels = array.shape[-1]
    return ImageSource(
        path=path,
        files=None,
        count=int(array.shape[0]),
        native_shapes={(int(array.shape[1]), int(array.shape[2]), int(channels))},
        max_pixels=max_pixels,
        _array=array,
        _scale=_pixel_scale(array, path),
    )


def image_bytes_keys(images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(N, H*W*C) uint8: pixels quantized to 8 bits, one row per image (exact-duplicate search).

    Built in chunks so the float temporaries stay at ``chunk`` images.
    """
    images = np.asarray(images)
    flat = images.reshape(len(images), -1)
    out = np.empty(flat.shape, dtype=np.uint8)
    work = np.empty((min(chunk, len(images)), flat.shape[1]), dtype=np.float32)  # one buffer, reused
    for start in range(0, len(images), chunk):
        part = work[: len(flat[start : start + chunk])]
        np.multiply(flat[start : start + chunk], np.float32(255), out=part)
        out[start : start + chunk] = np.rint(part, out=part)
    return out
