"""Copies in embedding space: precomputed feature vectors or a TorchScript embedder, searched by cosine.

Pixel distances miss semantic copies of large images; copy detection uses embeddings instead (SSCD,
Pizzi et al. 2022, "A self-supervised descriptor for image copy detection"; DINO or CLIP features). No
model is downloaded here: the user brings either

- the vectors: ``--features-train X.npy --features-generated Y.npy`` (or ``file.npz:key``), one row per
  item in the order the audit numbers the items, any width, float; or
- the model: ``--embedder model.pt``, a TorchScript file (``torch.jit.load`` only, never pickle), applied
  to the images in batches: resized to ``--embedder-size`` (bilinear, antialiased), normalized with
  ``--embedder-mean`` / ``--embedder-std`` per channel, grey images repeated to three channels; its
  output (B, D) (or (B, ...) flattened) is the feature vector.

Rows are L2-normalized; the nearest training items of each output come from a faiss exact inner-product
search (cosine similarity). Criteria: ``similar`` (cosine similarity to the nearest >= threshold, 0.5
by default: the SSCD convention, used by Somepalli et al. 2023, "Diffusion art or digital forgery?", to
call a generation a replication) and ``feature_ratio`` (d1/d2 below the ratio threshold, with d the
Euclidean distance between unit vectors, sqrt(2 - 2 cos)).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protomem.audit.inputs import require_memory, split_array_key
from protomem.errors import ProtomemError

SSCD_MEAN = (0.485, 0.456, 0.406)  # the ImageNet statistics SSCD's TorchScript models expect
SSCD_STD = (0.229, 0.224, 0.225)


@dataclass
class FeatureSpace:
    """Unit feature vectors of the training items and a way to get those of a batch of outputs.

    Attributes:
        label: where the vectors come from, for the report ("features X.npy / Y.npy", "embedder m.pt").
        train: (P, D) float32 unit rows.
        outputs: (start, batch of outputs) -> (len(batch), D) float32 unit rows.
    """

    label: str
    train: np.ndarray
    outputs: Callable[[int, object], np.ndarray]


def unit_rows(vectors: np.ndarray, path: Path | str, offset: int = 0, chunk: int = 8192) -> np.ndarray:
    """(N, D) float32 rows scaled to length 1; NaN, infinity or an all-zero row is an error naming it."""
    out = np.empty(vectors.shape, dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        part = np.asarray(vectors[start : start + chunk], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(part).all(axis=1))
        if bad.size:
            raise ProtomemError(
                "feature vector has NaN or infinity", path=path, where=f"row {offset + start + bad[0]}"
            )
        norms = np.linalg.norm(part, axis=1)
        if (norms == 0).any():
            row = offset + start + int(np.flatnonzero(norms == 0)[0])
            raise ProtomemError("feature vector is all zeros (no direction)", path=path, where=f"row {row}")
        out[start : start + chunk] = part / norms[:, None]
    return out


def load_features(path: str | Path, rows: int, items: str) -> np.ndarray:
    """The (rows, D) feature array of a .npy / ``.npz:key`` file (memory-mapped .npy), checked: 2-D, one row
    per item (``items``: "training items" or "outputs", for the error), numbers; finite and non-zero rows
    are checked by :func:`unit_rows`."""
    from protomem.audit.inputs import _load_array

    file, key = split_array_key(path)
    if not file.is_file():
        raise ProtomemError("no such file", path=file)
    if file.suffix.lower() not in (".npy", ".npz"):
        raise ProtomemError("feature vectors must be a .npy or .npz array (one row per item)", path=file)
    array = _load_array(file, key)
    if array.ndim != 2:
        raise ProtomemError(
            f"feature array must be 2-D (items, dimensions), got shape {array.shape}", path=file
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ProtomemError(f"feature array must hold numbers, got dtype {array.dtype}", path=file)
    if array.shape[0] != rows:
        raise ProtomemError(f"has {array.shape[0]:,} rows but there are {rows:,} {items}", path=file)
    if array.shape[1] == 0:
        raise ProtomemError("feature vectors have no dimensions", path=file)
    return array


def precomputed_space(
    train_path: str | Path, generated_path: str | Path, n_train: int, n_generated: int
) -> FeatureSpace:
    """A :class:`FeatureSpace` from two feature files (rows = items of the training data / outputs)."""
    train = load_features(train_path, n_train, "training items")
    generated = load_features(generated_path, n_generated, "outputs")
    if generated.shape[1] != train.shape[1]:
        raise ProtomemError(
            f"feature vectors have {generated.shape[1]} dimensions, the training features {train.shape[1]}",
            path=generated_path,
        )
    require_memory(train.shape[0] * train.shape[1] * 4, "training feature vectors", train_path)
    unit_train = unit_rows(train, train_path)
    unit_rows(generated, generated_path)  # check every row now, before the audit starts

    def outputs(start: int, batch: object) -> np.ndarray:
        return unit_rows(generated[start : start + len(batch)], generated_path, offset=start)

    return FeatureSpace(
        f"features {Path(train_path).name} / {Path(generated_path).name}", unit_train, outputs
    )


class Embedder:
    """A TorchScript image embedder: (B, H, W, C) float images in [0, 1] -> (B, D) float32 unit rows.

    Args:
        path: a TorchScript file (``torch.jit.save``); loaded with ``torch.jit.load`` on the CPU, never
            unpickled. A TorchScript model is a program: run only models you trust.
        size: resize the images to size x size first (None: keep their size).
        mean, std: per-channel normalization, (x - mean) / std, after the resize (three values each).
    """

    def __init__(
        self,
        path: str | Path,
        size: int | None = None,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
    ) -> None:
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise ProtomemError("no such file", path=self.path)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ProtomemError("--embedder-mean and --embedder-std take three numbers, std > 0", path=path)
        try:
            with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; SSCD ships as one
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(self.path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError, ValueError... for anything not TorchScript
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ProtomemError(
                f"not a TorchScript model (torch.jit.load: {reason[:160]})", path=path
            ) from None
        self.model.eval()
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.width: int | None = None

    def __call__(self, images: np.ndarray, offset: int = 0) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size is not None and tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        x = (x - self.mean) / self.std
        try:
            with torch.inference_mode():
                y = self.model(x)
        except Exception as exc:  # anything the user's model raises
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise ProtomemError(
                f"the embedder failed on a batch of shape {tuple(x.shape)} ({reason[:160]})", path=self.path
            ) from None
        if not isinstance(y, torch.Tensor) or y.ndim < 2 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ProtomemError(
                f"the embedder returned {shape} for a batch of {x.shape[0]} images, expected "
                "(batch, dimensions)",
                path=self.path,
            )
        vectors = y.reshape(y.shape[0], -1).to(torch.float32).numpy()
        if self.width is not None and vectors.shape[1] != self.width:
            raise ProtomemError(
                f"the embedder returned {vectors.shape[1]} dimensions, earlier {self.width}", path=self.path
            )
        self.width = vectors.shape[1]
        return unit_rows(vectors, f"{self.path} (output of image {offset}+)")


def embedder_space(embedder: Embedder, train: np.ndarray, batch_size: int) -> FeatureSpace:
    """A :class:`FeatureSpace` from an embedder applied to the training images now and to each batch of
    outputs as it comes. ``train``: (P, H, W, C) float32 in [0, 1]."""
    parts = [embedder(train[s : s + batch_size], offset=s) for s in range(0, len(train), batch_size)]
    unit_train = np.concatenate(parts)

    def outputs(start: int, batch: object) -> np.ndarray:
        return embedder(np.asarray(batch), offset=start)

    return FeatureSpace(f"embedder {embedder.path.name}", unit_train, outputs)


def nearest_cosine(train: np.ndarray, queries: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(similarities (K, k) descending, indices (K, k)) of the unit rows of ``train`` nearest each query
    (faiss exact inner-product search); -inf / -1 where fewer than k training rows exist."""
    import faiss

    take = min(k, train.shape[0])
    sims = np.full((queries.shape[0], k), -np.inf)
    indices = np.full((queries.shape[0], k), -1, dtype=np.int64)
    found_sims, found = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(train, dtype=np.float32),
        take,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    sims[:, :take] = np.clip(found_sims, -1.0, 1.0)
    indices[:, :take] = found
    return sims, indices


def cosine_distance(similarity: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors of cosine ``similarity``: sqrt(2 - 2 cos), in [0, 2]."""
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.asarray(similarity, dtype=np.float64)))


def feature_columns(space: FeatureSpace, start: int, batch: object) -> dict[str, np.ndarray]:
    """Per-output columns in feature space: nearest and second-nearest training item by cosine, their
    similarities and the d1/d2 ratio of the unit-vector distances."""
    from protomem.memorization.near import distance_ratio

    queries = space.outputs(start, batch)
    sims, indices = nearest_cosine(space.train, queries, k=2)
    d1, d2 = cosine_distance(sims[:, 0]), cosine_distance(sims[:, 1])
    return {
        "feature_train": indices[:, 0],
        "feature_similarity": sims[:, 0],
        "feature_second_similarity": sims[:, 1],
        # one training item: no second-nearest, no ratio
        "feature_d1_over_d2": np.where(np.isfinite(d2), distance_ratio(d1, d2), np.nan),
    }
