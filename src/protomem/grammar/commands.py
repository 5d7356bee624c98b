"""``protomem grammar ...``: draw grammars and strings, check strings against a grammar."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import numpy as np
import typer
from rich.console import Console

from protomem.errors import ProtomemError

app = typer.Typer(
    help="The Random Hierarchy Model: sample grammars and strings, check strings.", no_args_is_help=True
)
console = Console(stderr=True)


class StringFormat(StrEnum):
    parquet = "parquet"
    jsonl = "jsonl"


def parse_levels(text: str | None) -> list[int] | None:
    """'0,1' -> [0, 1]; None or '' or 'all' -> None (all levels)."""
    if text is None or text.strip() in ("", "all"):
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ProtomemError(f"--zipf-levels must be comma-separated integers, got {text!r}") from None


@app.command()
def sample(
    out: Path = typer.Option(..., "--out", help="Output directory (must not exist or be empty)."),
    vocab: int = typer.Option(8, "--vocab", help="Symbols per level, v."),
    classes: int = typer.Option(8, "--classes", help="Root classes, n."),
    rules: int = typer.Option(3, "--rules", help="Rules per symbol, m."),
    branching: int = typer.Option(2, "--branching", help="Children per rule, s."),
    depth: int = typer.Option(3, "--depth", help="Levels, L (strings have s^L tokens)."),
    zipf: float = typer.Option(0.0, "--zipf", help="Zipf exponent a of rule probabilities (0 = uniform)."),
    zipf_levels: str = typer.Option(None, "--zipf-levels", help="Skewed levels, e.g. '0,1' (default all)."),
    count: int = typer.Option(1000, "--count", help="Strings to draw."),
    seed: int = typer.Option(0, "--seed", help="Seed for the grammar and the strings."),
    distinct: bool = typer.Option(False, "--distinct", help="Draw distinct strings (a training set)."),
    fmt: StringFormat = typer.Option(StringFormat.parquet, "--format", help="Strings file format."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
) -> None:
    """Draw a grammar and strings from it: writes OUT/grammar.json and OUT/strings.parquet|jsonl."""
    from protomem import limits
    from protomem.grammar import sample_distinct_strings, sample_grammar, sample_strings, save_grammar
    from protomem.io import new_output_dir, write_strings
    from protomem.outputs import check_output_dir

    if count < 1:
        raise ProtomemError(f"--count must be at least 1, got {count}")
    if not 0 <= seed < 1 << 63:
        raise ProtomemError(f"--seed must lie in [0, 2^63), got {seed}")
    check_output_dir(out, overwrite=overwrite)
    grammar = sample_grammar(
        vocab,
        classes,
        rules,
        branching,
        depth,
        seed=seed,
        zipf_exponent=zipf,
        zipf_levels=parse_levels(zipf_levels),
    )
    limits.TOTAL_TOKENS.check(count * grammar.length, "--count x string length")
    # The strings use a stream independent of the grammar's, so changing --count keeps the grammar.
    string_seed = np.random.SeedSequence([seed, 1])
    draw = sample_distinct_strings if distinct else sample_strings
    strings = draw(grammar, count, seed=np.random.default_rng(string_seed))
    with new_output_dir(out, overwrite=overwrite) as staging:
        save_grammar(grammar, staging / "grammar.json")
        write_strings(staging / f"strings.{fmt.value}", strings.tokens, strings.classes, strings.logprob)
    console.print(
        f"wrote {out}/grammar.json and {out}/strings.{fmt.value}: {count} strings of {grammar.length} tokens"
    )


@app.command()
def check(
    grammar_path: Path = typer.Option(..., "--grammar", help="grammar.json"),
    strings_path: Path = typer.Option(..., "--strings", help="Strings: .parquet, .jsonl or .txt"),
    out: Path = typer.Option(None, "--out", help="Per-string results (.parquet or .jsonl)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Parse strings: print the valid fraction per level; with --out, write per-string results."""
    from rich.table import Table

    from protomem.grammar import load_grammar, parse, valid_fraction_per_level
    from protomem.io import read_strings, string_format_of
    from protomem.outputs import check_output_file

    if out is not None:
        if string_format_of(out) not in ("parquet", "jsonl"):
            raise ProtomemError("--out must end in .parquet or .jsonl", path=out)
        check_output_file(out, overwrite=overwrite, inputs=[grammar_path, strings_path])
    grammar = load_grammar(grammar_path)
    table = read_strings(strings_path, vocab_size=grammar.vocab_size, length=grammar.length)
    result = parse(grammar, table.tokens)
    fractions = valid_fraction_per_level(result)
    view = Table(title=f"{len(table)} strings from {strings_path}")
    view.add_column("level")
    view.add_column("block size (tokens)", justify="right")
    view.add_column("valid fraction", justify="right")
    for level in range(grammar.depth - 1, -1, -1):
        view.add_row(str(level), str(grammar.branching ** (grammar.depth - level)), f"{fractions[level]:.4f}")
    Console().print(view)
    Console().print(f"fully valid: {result.valid.mean():.4f}")
    if out is not None:
        _write_check_results(out, result)
        console.print(f"wrote {out}")


def _write_check_results(out: Path, result) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from protomem.io import atomic_path, string_format_of

    columns = {
        "valid": result.valid.tolist(),
        "deepest_valid_level": result.deepest_valid_level.tolist(),
        "class": [None if c < 0 else int(c) for c in result.classes],
        "logprob": [None if np.isnan(lp) else float(lp) for lp in result.logprob],
    }
    with atomic_path(out) as tmp:
        if string_format_of(out) == "parquet":
            schema = pa.schema(
                [
                    ("valid", pa.bool_()),
                    ("deepest_valid_level", pa.int64()),
                    ("class", pa.int64()),
                    ("logprob", pa.float64()),
                ]
            )
            pq.write_table(pa.table(columns, schema=schema), tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for i in range(len(columns["valid"])):
                    handle.write(json.dumps({name: values[i] for name, values in columns.items()}) + "\n")
