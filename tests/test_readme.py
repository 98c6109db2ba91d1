"""The counts the README quotes are the counts of the tests that make them; a test fails when they drift.
(The command line's count is checked beside its rows: tests/test_cli_errors.py.)"""
import math
import re

from conftest import REPO


def cases(test) -> int:
    """How many cases pytest runs of a test function: the product of its parametrize lists."""
    return math.prod(len(mark.args[1]) for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize")


def test_the_optimizer_bad_input_counts_are_those_of_the_contract_tests():
    import test_optim_contract as contract
    per_backend = len(contract.BAD_INPUTS) + 1  # the table's rows, and a grad in another dtype (its own test)
    total = (cases(contract.test_bad_input_raises_one_clear_line_and_changes_nothing)
             + cases(contract.test_a_grad_in_another_dtype_is_refused_before_anything_changes))
    assert total == per_backend * len(contract.BACKENDS)
    section = (REPO / "README.md").read_text().split("### Bad input", 1)[1].split("\n## ", 1)[0]
    quoted = re.search(r"\*\*(\d+) bad inputs on each backend \((\d+)\s+cases\)", section.replace("\n", " "))
    assert quoted, "the README's Bad input section no longer says how many inputs it tried"
    assert (int(quoted.group(1)), int(quoted.group(2))) == (per_backend, total)
    claims = re.findall(r"(\d+) of (\d+)", section)
    assert claims and all((int(a), int(b)) == (total, total) for a, b in claims), claims
