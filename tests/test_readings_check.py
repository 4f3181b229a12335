"""The readings checker itself (tests/readings_check.py): it must flag a typed-in number."""

from readings_check import underived_numbers

METRICS = {"a/tv": 0.3663, "a/share": [0.312, 0.05], "a/p": 3.81e-25, "a/n": 195, "a/by_model": {"x": 2.8213}}


def test_numbers_the_metrics_hold_pass_at_the_printed_precision():
    lines = ["1. TV 0.37 [0.4] over 195 prompts; winner first 31% (p = 3.8e-25); gpt-4-0613 2.82; positions 1-7, 95%"]
    assert underived_numbers(lines, METRICS) == []


def test_a_number_no_metric_holds_is_flagged():
    assert underived_numbers(["2. TV 0.28 at KL 2.3 over 196 prompts"], METRICS) == [
        ("0.28", "2. TV 0.28 at KL 2.3 over 196 prompts"), ("2.3", "2. TV 0.28 at KL 2.3 over 196 prompts"),
        ("196", "2. TV 0.28 at KL 2.3 over 196 prompts")]
    assert underived_numbers(["share 12%"], METRICS) == [("12%", "share 12%")]
