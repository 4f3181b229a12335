"""Notebook 02 executed end to end through papermill, small settings, with its optional live-judge
part pointed at a fake OpenAI-compatible server on 127.0.0.1."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from readings_check import reading_lines, underived_numbers
from starling_lib import bias

pytestmark = pytest.mark.slow

KEY = "sk-test-" + "N0tebookS3cret" * 2
RANKING = "This is a good natured conversation.\n\n[['C', 'A', 'B', 'D', 'E', 'F', 'G']]"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.authorizations.append(self.headers.get("Authorization"))
        body = json.dumps({
            "id": "chatcmpl-nb", "object": "chat.completion", "created": 0, "model": "fake-judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": RANKING}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, run_notebook):
    tmp = tmp_path_factory.mktemp("nb02")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.authorizations = []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    env = {"STARLING_JUDGE_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1",
           "STARLING_JUDGE_MODEL": "fake-judge", "STARLING_JUDGE_API_KEY": KEY}
    try:
        out, metrics = run_notebook("02_positional_bias", tmp, {"sim_prompts": 40, "n_bootstrap": 200, "live_prompts": 3, "seed": 1},
                                    env=env)
    finally:
        server.shutdown()
        server.server_close()
    return tmp, out, metrics, server.authorizations


def test_top_position_reproduces_the_six_bundled_runs(executed):
    _, _, m, _ = executed
    table = m["bias/top_position"]
    assert set(table) == set(bias.RATING_VARIANTS)  # metrics.json sorts keys
    for name, p in table.items():
        assert len(p) == 7 and sum(p) == pytest.approx(1.0), name
    # winner positions counted by hand in bundled/nectar_rating_experiments/no_pairwise (195 prompts)
    assert table["no_pairwise"] == pytest.approx([c / 195 for c in (61, 60, 34, 19, 9, 6, 6)])
    assert table["tiebreak_order_given"] == pytest.approx([c / 187 for c in (40, 27, 19, 30, 23, 27, 21)])


def test_summary_numbers_order_the_variants(executed):
    _, _, m, _ = executed
    assert m["bias/no_pairwise/tv_distance"] == pytest.approx(0.3663, abs=1e-4)
    assert m["bias/tiebreak_order_given/tv_distance"] == pytest.approx(0.0917, abs=1e-4)
    assert m["bias/most_biased"] == "no_pairwise" and m["bias/least_biased"] == "tiebreak_order_given"
    assert m["bias/no_pairwise/chi2_p_value"] < 1e-20 < 0.05 < m["bias/tiebreak_order_given/chi2_p_value"]
    assert m["bias/no_pairwise/num_ratings"] == 195
    assert all("/" in key for key in m) and m["params/sim_prompts"] == 40


def test_simulated_part_uses_the_same_statistics(executed):
    _, out, m, _ = executed
    assert m["bias/sim/num_prompts"] == 40
    assert set(m["bias/sim/top_position"]) == set(bias.RATING_VARIANTS)
    for variant in bias.RATING_VARIANTS:
        for who in ("biased", "unbiased"):
            assert 0 <= m[f"bias/sim/{who}/{variant}/tv_distance"] <= 6 / 7
            assert -1 <= m[f"bias/sim/{who}/{variant}/kendall_tau"] <= 1
        run = bias.load_rating_run(out / "simulated" / "biased" / variant)
        assert len(run) == 40
    # The two judges share their noise draws, and the bonus is largest at position 1, so every prompt
    # the unbiased judge gave to position 1 the biased one does too, and some more.
    firsts = {who: sum(r["ranking_order"] is not None and r["ranking_order"][0] == 0
                       for r in bias.load_rating_run(out / "simulated" / who / "no_pairwise"))
              for who in ("biased", "unbiased")}
    assert firsts["biased"] > firsts["unbiased"]


def test_live_part_ran_against_the_local_server_and_no_key_reached_disk(executed):
    tmp, out, m, authorizations = executed
    assert authorizations == [f"Bearer {KEY}"] * 3
    assert m["bias/live/num_ratings"] == 3 and m["bias/live/num_unparsed"] == 0
    assert m["bias/live/top_position"] == [0, 0, 1, 0, 0, 0, 0]  # the fake judge always puts C first
    assert (m["bias/live/prompt_tokens"], m["bias/live/completion_tokens"]) == (300, 60)
    assert (out / "live" / "tiebreak_order_given" / "cache.jsonl").exists()
    assert {p.stem for p in (out / "figures").glob("*.png")} == {
        "top_position_by_variant", "tv_change_by_variant", "position_rank_matrices", "simulated_top_position",
        "simulated_label_quality", "live_top_position"}
    for path in tmp.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".jsonl", ".ipynb"}:
            assert KEY not in path.read_text(), f"the API key leaked into {path}"


def test_every_printed_reading_is_derived_from_this_run(executed):
    tmp, _, m, _ = executed
    lines = reading_lines(tmp / "02_positional_bias.ipynb")
    assert sum(line.startswith(tuple(f"{i}." for i in range(1, 7))) for line in lines) >= 10, lines
    assert any("live run" in line for line in lines)
    assert underived_numbers(lines, m) == []
    # every mitigation's change in TV against the plain ranking is recorded with its interval
    for variant in bias.RATING_VARIANTS:
        if variant != "no_pairwise":
            low, diff, high = (m[f"bias/{variant}/tv_change_vs_plain{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert low <= diff <= high, variant
