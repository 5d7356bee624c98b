"""``run_audit``: files in, run directory out (matches.parquet, per_train.parquet, summary.json, report.html).

Memory: the training set is held in memory (images: P x H x W x C float32; text/sequences: 16 bytes per
training token for the k-gram index plus the tokens and, for text, the documents and their vocabulary);
the outputs are read from their file and audited in batches of ``config.batch_size``, and only their
per-output result rows (about 200 bytes each) are kept. The few outputs the report draws are read back
in a second pass over the file (:func:`protomem.audit.report.pairs_to_show` picks them).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from protomem.audit.core import AuditConfig, AuditResult, audit_images, audit_sequences, audit_text
from protomem.audit.inputs import (
    batches,
    count_documents,
    count_sequences,
    detect_modality,
    iter_documents,
    iter_sequences,
    open_images,
    read_documents,
    read_sequences,
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
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, AuditResult]:
    """Audit the outputs in ``generated_path`` against ``train_path``; write everything to ``out_dir``."""
    train_path, generated_path, out_dir = Path(train_path), Path(generated_path), Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ProtomemError(
            "output directory exists and is not empty (pass --overwrite to replace it)", path=out_dir
        )
    modality = resolve_modality(train_path, generated_path, config.modality)
    bar = Progress(
        TextColumn("[bold]audit[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    with bar:
        if modality == "images":
            train_source = open_images(train_path)
            train_source.conform(None, config.resize)
            generated_source = open_images(generated_path)
            generated_source.conform(train_source.shape, config.resize)
            if generated_source.shape[2] != train_source.shape[2]:
                train_source.shape = generated_source.shape  # grey training vs colour outputs: promote
            load = bar.add_task("reading training images", total=train_source.count)
            chunks = []
            for _, batch in train_source.batches(config.batch_size):
                chunks.append(batch)
                bar.advance(load, len(batch))
            train = np.concatenate(chunks)
            task = bar.add_task("outputs", total=generated_source.count)
            result = audit_images(
                train,
                generated_source.batches(config.batch_size),
                config,
                on_batch=lambda n: bar.advance(task, n),
            )

            def output_item(i: int) -> np.ndarray:
                return generated_source.read([i])[0]

            def train_item(i: int) -> np.ndarray:
                return train[i]
        elif modality == "sequences":
            train_seq = read_sequences(train_path)
            grammar = None
            if grammar_path is not None:
                from protomem.grammar import load_grammar

                grammar = load_grammar(grammar_path)
            result, shown = _audit_streamed(
                audit_sequences,
                train_seq,
                generated_path,
                iter_sequences,
                count_sequences,
                config,
                bar,
                grammar=grammar,
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
            train_docs = read_documents(train_path)
            result, shown = _audit_streamed(
                audit_text, train_docs, generated_path, iter_documents, count_documents, config, bar
            )

            def words(document: str) -> list[str]:
                return (document.lower() if config.lowercase else document).split()

            def output_item(i: int) -> list:
                return words(shown[i])

            def train_item(i: int) -> list:
                return words(train_docs[i])

    inputs = {"train": str(train_path), "generated": str(generated_path)}
    result.summary["inputs"] = inputs
    result.summary["versions"] = _versions()
    with new_output_dir(out_dir, overwrite=overwrite) as staging:
        result.matches.to_parquet(staging / "matches.parquet", index=False)
        result.per_train.to_parquet(staging / "per_train.parquet", index=False)
        write_report(
            result, staging / "report.html", inputs=inputs, output_item=output_item, train_item=train_item
        )
        write_json_atomic(staging / "summary.json", _json_ready(result.summary))
    return out_dir, result


def _audit_streamed(
    audit: Callable[..., AuditResult],
    train: list,
    generated_path: Path,
    iterate: Callable[[Path], Iterator[T]],
    count: Callable[[Path], int],
    config: AuditConfig,
    bar: Progress,
    **options: object,
) -> tuple[AuditResult, dict[int, T]]:
    """Audit the outputs of a file read one batch at a time (``iterate``: the file's reader, ``count``: its
    cheap count for the bar), then read back the outputs the report draws: (result, {output index: item}).
    """
    task = bar.add_task("outputs", total=count(generated_path))
    stream = batches(iterate(generated_path), config.batch_size)
    result = audit(train, stream, config, on_batch=lambda n: bar.advance(task, n), **options)
    return result, _read_back(iterate(generated_path), pairs_to_show(result.matches, result.modality), bar)


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
