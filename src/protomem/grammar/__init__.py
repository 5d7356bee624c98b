"""The Random Hierarchy Model: rules, sampling, likelihood, parsing, prototypicality (numpy only)."""

from protomem.grammar.counting import enumerate_strings, n_valid_strings
from protomem.grammar.parsing import (
    ParseResult,
    block_valid_fraction_per_level,
    log_likelihood,
    parse,
    valid_fraction_per_level,
)
from protomem.grammar.rhm import (
    RHM,
    grammar_from_dict,
    load_grammar,
    sample_grammar,
    save_grammar,
    zipf_probs,
)
from protomem.grammar.sampling import Derivations, sample_distinct_strings, sample_strings

__all__ = [
    "RHM",
    "Derivations",
    "ParseResult",
    "block_valid_fraction_per_level",
    "enumerate_strings",
    "grammar_from_dict",
    "load_grammar",
    "log_likelihood",
    "n_valid_strings",
    "parse",
    "sample_distinct_strings",
    "sample_grammar",
    "sample_strings",
    "save_grammar",
    "valid_fraction_per_level",
    "zipf_probs",
]
