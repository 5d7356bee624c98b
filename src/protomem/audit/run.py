"""``run_audit``: files in, run directory out (matches.parquet, per_train.parquet, summary.json, report.html).

Both tables name the source of every item (``generated_source``, ``train_source``: the file name for a
folder, ``line N`` / ``row N`` for a text, jsonl or Parquet file, ``index i`` for an array; see
:mod:`protomem.audit.inputs`), and matches.parquet's schema metadata ``protomem.spaces`` says in which
space each flag was computed (pixels, tokens, words, features of a given file or embedder).

Memory: the training set is held in memory (images: P x H x W x C float32 plus an 8-bit copy, checked
against the memory available before reading; text/sequences: 16 bytes per
training token for the k-gram index plus the tokens and, for text, the documents and their vocabulary);
the outputs are read from their file and audited in batches of ``config.batch_size``, and only their
per-output result rows (about 200 bytes each) are kept. The few outputs the report draws are read back
in a second pass over the file (:func:`protomem.audit.report.pairs_to_show` picks them).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from protomem.audit.core import (
    AuditConfig,
    AuditResult,
    audit_images,
    audit_sequences,
    audit_text,
    check_image_settings,
    check_training_images,
)
from protomem.audit.features import Embedder, FeatureSpace, embedder_space, precomputed_space
from protomem.audit.inputs import (
    batches,
    count_documents,
    count_sequences,
    detect_modality,
    labelled_documents,
    labelled_sequences,
    open_images,
    unzip_labelled,
)
from protomem.audit.report import pairs_to_show, write_report
from protomem.errors import ProtomemError
from protomem.io import new_output_dir, write_json_atomic

T = TypeVar("T")


def resolve_modality(train: Path, generated: Path, forced: str) -> str:
    """The audit's modality: forced, or detected from both inputs (which must agree)."""
    if forced != "auto":
        return forced
    train_kind = detect_modality(train)
    generated_kind = detect_modality(generated)
    if train_kind != generated_kind:
        raise ProtomemError(
            f"holds {generated_kind} but the training data ({train}) holds {train_kind} "
            "(mismatched modalities; pass --modality to force one)",
            path=generated,
        )
    return train_kind


def _versions() -> dict[str, str]:
    import faiss

    import protomem

    return {
        "protomem": getattr(protomem, "__version__", "unknown"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
    }


def run_audit(
    train_path: str | Path,
    generated_path: str | Path,
    out_dir: str | Path,
    config: AuditConfig,
    *,
    grammar_path: str | Path | None = None,
    features_train: str | Path | None = None,
    features_generated: str | Path | None = None,
    embedder: Embedder | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, AuditResult]:
    """Audit the outputs in ``generated_path`` against ``train_path``; write everything to ``out_dir``.

    ``features_train`` / ``features_generated``: feature vectors of both sides (one row per item); or
    ``embedder``: a TorchScript model applied to the images. Either adds the feature-space criteria.
    """
    train_path, generated_path, out_dir = Path(train_path), Path(generated_path), Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ProtomemError(
            "output directory exists and is not empty (pass --overwrite to replace it)", path=out_dir
        )
    if (features_train is None) != (features_generated is None):
        raise ProtomemError("--features-train and --features-generated go together (one row per item each)")
    if embedder is not None and features_train is not None:
        raise ProtomemError(
            "give either --embedder or precomputed --features-*, not both", path=embedder.path
        )
    modality = resolve_modality(train_path, generated_path, config.modality)
    if embedder is not None and modality != "images":
        raise ProtomemError(f"--embedder applies to images, not to {modality}", path=embedder.path)
    bar = Progress(
        TextColumn("[bold]audit[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )

    def feature_space(n_train: int, n_generated: int) -> FeatureSpace | None:
        if features_train is None:
            return None
        return precomputed_space(features_train, features_generated, n_train, n_generated)

    with bar:
        if modality == "images":
            train_source = open_images(train_path, config.max_image_pixels)
            check_training_images(train_source.count, train_path)
            train_source.conform(None, config.resize)
            generated_source = open_images(generated_path, config.max_image_pixels)
            generated_source.conform(train_source.shape, config.resize)
            if generated_source.shape[2] != train_source.shape[2]:
                train_source.shape = generated_source.shape  # grey training vs colour outputs: promote
            check_image_settings(config, train_source.shape, generated_path)
            extra = 4 if config.normalized else 0  # the standardized copy of the training images
            train_source.require_memory(4 + 1 + extra, "training images")
            load = bar.add_task("reading training images", total=train_source.count)
            train = np.empty((train_source.count, *train_source.shape), dtype=np.float32)
            for start, batch in train_source.batches(config.batch_size):
                train[start : start + len(batch)] = batch
                bar.advance(load, len(batch))
            space = feature_space(train_source.count, generated_source.count)
            if embedder is not None:
                space = embedder_space(embedder, train, config.batch_size)
            train_sources, generated_sources = train_source.sources(), generated_source.sources()
            task = bar.add_task("outputs", total=generated_source.count)
            result = audit_images(
                train,
                generated_source.batches(config.batch_size),
                config,
                on_batch=lambda n: bar.advance(task, n),
                features=space,
            )

            def output_item(i: int) -> np.ndarray:
                return generated_source.read([i])[0]

            def train_item(i: int) -> np.ndarray:
                return train[i]
        elif modality == "sequences":
            train_sources, train_seq = unzip_labelled(labelled_sequences(train_path))
            grammar = None
            if grammar_path is not None:
                from protomem.grammar import load_grammar

                grammar = load_grammar(grammar_path)
            space = feature_space(len(train_seq), count_sequences(generated_path))
            result, shown, generated_sources = _audit_streamed(
                audit_sequences,
                train_seq,
                generated_path,
                labelled_sequences,
                count_sequences,
                config,
                bar,
                grammar=grammar,
                features=space,
            )

            def output_item(i: int) -> list:
                return shown[i].tolist()

            def train_item(i: int) -> list:
                return train_seq[i].tolist()
        else:
            if grammar_path is not None:
                raise ProtomemError(
                    "--grammar applies to token sequences, not to plain text", path=grammar_path
                )
            train_sources, train_docs = unzip_labelled(labelled_documents(train_path))
            space = feature_space(len(train_docs), count_documents(generated_path))
            result, shown, generated_sources = _audit_streamed(
                audit_text,
                train_docs,
                generated_path,
                labelled_documents,
                count_documents,
                config,
                bar,
                features=space,
            )

            def words(document: str) -> list[str]:
                return (document.lower() if config.lowercase else document).split()

            def output_item(i: int) -> list:
                return words(shown[i])

            def train_item(i: int) -> list:
                return words(train_docs[i])

    add_sources(result, train_sources, generated_sources)
    inputs = {"train": str(train_path), "generated": str(generated_path)}
    if features_train is not None:
        inputs.update(features_train=str(features_train), features_generated=str(features_generated))
    if embedder is not None:
        inputs["embedder"] = str(embedder.path)
    result.summary["inputs"] = inputs
    result.summary["versions"] = _versions()
    with new_output_dir(out_dir, overwrite=overwrite) as staging:
        write_table(result.matches, staging / "matches.parquet", result.summary["spaces"])
        write_table(result.per_train, staging / "per_train.parquet", result.summary["spaces"])
        write_report(
            result, staging / "report.html", inputs=inputs, output_item=output_item, train_item=train_item
        )
        write_json_atomic(staging / "summary.json", _json_ready(result.summary))
    return out_dir, result


def add_sources(result: AuditResult, train_sources: list[str], generated_sources: list[str]) -> None:
    """Name the source of every item: ``generated_source`` (and ``train_source`` of the copied item, None
    when none) in ``matches``, ``train_source`` in ``per_train``."""
    matches, per_train = result.matches, result.per_train
    names = np.asarray(train_sources, dtype=object)
    matches.insert(1, "generated_source", np.asarray(generated_sources, dtype=object))
    index = matches["train_index"].to_numpy()
    matches["train_source"] = np.where(index >= 0, names[np.maximum(index, 0)], None)
    per_train.insert(1, "train_source", names)


def write_table(table: pd.DataFrame, path: Path, spaces: dict[str, str]) -> None:
    """Parquet with the flags' spaces in the schema metadata (key ``protomem.spaces``, JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {**(arrow.schema.metadata or {}), b"protomem.spaces": json.dumps(spaces).encode()}
    pq.write_table(arrow.replace_schema_metadata(metadata), path)


def _audit_streamed(
    audit: Callable[..., AuditResult],
    train: list,
    generated_path: Path,
    labelled: Callable[[Path], Iterator[tuple[str, T]]],
    count: Callable[[Path], int],
    config: AuditConfig,
    bar: Progress,
    **options: object,
) -> tuple[AuditResult, dict[int, T], list[str]]:
    """Audit the outputs of a file read one batch at a time (``labelled``: the file's reader of (source,
    item) pairs, ``count``: its cheap count for the bar), then read back the outputs the report draws:
    (result, {output index: item}, the outputs' sources).
    """
    task = bar.add_task("outputs", total=count(generated_path))
    sources: list[str] = []

    def items() -> Iterator[T]:
        for source, item in labelled(generated_path):
            sources.append(source)
            yield item

    stream = batches(items(), config.batch_size)
    result = audit(train, stream, config, on_batch=lambda n: bar.advance(task, n), **options)
    second_pass = (item for _, item in labelled(generated_path))
    shown = _read_back(second_pass, pairs_to_show(result.matches, result.modality), bar)
    return result, shown, sources


def _read_back(items: Iterable[T], pairs: pd.DataFrame, bar: Progress) -> dict[int, T]:
    """{output index: item} for the outputs of the report's pairs, from a second pass over the stream of
    outputs that stops at the last of them."""
    wanted = {int(i) for i in pairs["output"]}
    found: dict[int, T] = {}
    if not wanted:
        return found
    last = max(wanted)
    task = bar.add_task("outputs for the report", total=last + 1)
    for i, item in enumerate(items):
        if i in wanted:
            found[i] = item
        bar.advance(task)
        if i == last:
            break
    return found


def _json_ready(value: object) -> object:
    """Replace NaN / inf by None and numpy scalars by Python ones, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value
