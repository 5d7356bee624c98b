"""``run_audit``: files in, run directory out (matches.parquet, per_train.parquet, summary.json, report.html).

Memory: the training set is held in memory (images: P x H x W x C float32; text/sequences: 16 bytes per
training token for the k-gram index plus the tokens); the outputs stream through in batches of
``config.batch_size``, and only their per-output result rows (about 200 bytes each) are kept.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from protomem.audit.core import AuditConfig, AuditResult, audit_images, audit_sequences, audit_text
from protomem.audit.inputs import detect_modality, open_images, read_documents, read_sequences
from protomem.errors import ProtomemError
from protomem.io import new_output_dir, write_json_atomic


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
            generated_seq = read_sequences(generated_path)
            grammar = None
            if grammar_path is not None:
                from protomem.grammar import load_grammar

                grammar = load_grammar(grammar_path)
            task = bar.add_task("outputs", total=len(generated_seq))
            result = audit_sequences(
                train_seq, generated_seq, config, on_batch=lambda n: bar.advance(task, n), grammar=grammar
            )

            def output_item(i: int) -> list:
                return generated_seq[i].tolist()

            def train_item(i: int) -> list:
                return train_seq[i].tolist()
        else:
            if grammar_path is not None:
                raise ProtomemError(
                    "--grammar applies to token sequences, not to plain text", path=grammar_path
                )
            train_docs = read_documents(train_path)
            generated_docs = read_documents(generated_path)
            task = bar.add_task("outputs", total=len(generated_docs))
            result = audit_text(train_docs, generated_docs, config, on_batch=lambda n: bar.advance(task, n))

            def output_item(i: int) -> list:
                return (generated_docs[i].lower() if config.lowercase else generated_docs[i]).split()

            def train_item(i: int) -> list:
                return (train_docs[i].lower() if config.lowercase else train_docs[i]).split()

    from protomem.audit.report import write_report

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
