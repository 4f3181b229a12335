"""Hub ids through the project's own loaders, offline, from a local Hugging Face cache (starling_lib/hub.py).

The cache is huggingface_hub's own layout, written by hand: `<cache>/<type>s--<org>--<name>/`
with `refs/<branch>` holding a commit and `snapshots/<commit>/` holding the files, which is what
`hf download` or a first online run leaves behind. With HF_HUB_OFFLINE set, the loaders must find
models, tokenizers and Nectar there by hub id and revision, and say what to do when they cannot.
"""

import json

import pandas as pd
import pytest
import torch
from hub_caches import NECTAR_CARD, hf_cache  # noqa: F401  (hf_cache: a fixture)
from hub_caches import nectar_parquet as _nectar_parquet
from hub_caches import put_hf as _put

from starling_lib import hub
from starling_lib.data import load_nectar
from starling_lib.models import load_model_and_tokenizer, load_tokenizer, tiny_model_path


def test_nectar_by_hub_id_and_revision_from_the_cache(hf_cache, tmp_path):
    rows = _nectar_parquet(tmp_path / "main.parquet", 20)
    _nectar_parquet(tmp_path / "old.parquet", 12)
    _put(hf_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "main.parquet"},
         "dataset")
    old = _put(hf_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "old.parquet"},
               "dataset", branch=None)   # an earlier commit: found by its hash, no ref needed
    ds = load_nectar("berkeley-nest/Nectar")
    assert len(ds) == 20 and ds["prompt"] == [r["prompt"] for r in rows]
    assert ds[0]["answers"][0]["rank"] == rows[0]["answers"][0]["rank"]
    assert len(load_nectar(f"berkeley-nest/Nectar@{old}")) == 12
    with pytest.raises(hub.HubError, match=r"data set berkeley-nest/Nectar@v9: HF_HUB_OFFLINE is set.*does not hold "
                                           r"this revision.*hf download berkeley-nest/Nectar --repo-type dataset --revision v9"):
        load_nectar("berkeley-nest/Nectar@v9")
    with pytest.raises(hub.HubError, match="data set berkeley-nest/Nectar-typo: HF_HUB_OFFLINE is set"):
        load_nectar("berkeley-nest/Nectar-typo")
    with pytest.raises(FileNotFoundError, match="neither 'bundled', an existing file nor a hub id"):
        load_nectar("not a source")


def test_a_bad_record_in_the_hub_copy_is_named_by_its_source(hf_cache, tmp_path):
    rows = _nectar_parquet(tmp_path / "rlaif.parquet", 6)
    rows[4]["prompt"] = rows[4]["prompt"].replace("\n\nHuman:", "\n\nUser:", 1)   # a wrong turn marker
    pd.DataFrame(rows).to_parquet(tmp_path / "rlaif.parquet")
    _put(hf_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "rlaif.parquet"},
         "dataset")
    with pytest.raises(ValueError, match=r"hub:berkeley-nest/Nectar record index 4: prompt does not start with"):
        load_nectar("berkeley-nest/Nectar")
    with pytest.warns(UserWarning, match=r"(?s)Nectar from hub:berkeley-nest/Nectar: read 6 records, kept 5.*dropped 1"):
        assert len(load_nectar("berkeley-nest/Nectar", on_error="skip")) == 5


def test_model_and_tokenizer_by_hub_id_and_revision_from_the_cache(hf_cache):
    tiny = tiny_model_path()
    files = {p.name: p for p in tiny.iterdir() if p.is_file()}
    commit = _put(hf_cache, "starling-test/tiny-chat", files, "model")
    model, tokenizer = load_model_and_tokenizer("starling-test/tiny-chat", device="cpu")
    local, _ = load_model_and_tokenizer(str(tiny), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert tokenizer.chat_template and load_tokenizer(f"starling-test/tiny-chat@{commit}").vocab_size == tokenizer.vocab_size
    with pytest.raises(hub.HubError, match=r"model starling-test/tiny-chat@v2: HF_HUB_OFFLINE is set.*--revision v2"):
        load_model_and_tokenizer("starling-test/tiny-chat@v2", device="cpu")


def test_reward_model_backbone_by_hub_id_and_revision_from_the_cache(hf_cache):
    from starling_lib.reward_model import build_reward_model

    tiny = tiny_model_path()
    commit = _put(hf_cache, "starling-test/tiny-chat", {p.name: p for p in tiny.iterdir() if p.is_file()}, "model")
    by_id, _ = build_reward_model(f"starling-test/tiny-chat@{commit}", seed=3)
    by_path, _ = build_reward_model(str(tiny), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(by_id.state_dict().values(), by_path.state_dict().values()))
    with pytest.raises(hub.HubError, match=r"model starling-test/tiny-chat@v2: HF_HUB_OFFLINE is set"):
        build_reward_model("starling-test/tiny-chat@v2")


def test_refused_access_says_how_to_log_in(monkeypatch):
    import huggingface_hub
    from httpx2 import Request, Response
    from huggingface_hub.errors import GatedRepoError

    response = Response(401, request=Request("GET", "https://huggingface.co/api/models/meta-llama/Llama-2-7b-chat-hf"))

    def refuse(*args, **kwargs):
        raise GatedRepoError("401 Client Error: access to this repository is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(hub.HubError, match=r"data set meta-llama/Llama-2-7b-chat-hf: access refused; the repository "
                                           r"is gated.*datasets/meta-llama/Llama-2-7b-chat-hf.*hf auth login.*HF_TOKEN"):
        hub.snapshot("meta-llama/Llama-2-7b-chat-hf")
    # transformers reports a refused model as an OSError of its own
    with pytest.raises(hub.HubError, match=r"model meta-llama/Llama-2-7b-chat-hf: access refused.*hf auth login"):
        with hub.hub_errors(hub.parse("meta-llama/Llama-2-7b-chat-hf")):
            raise OSError("You are trying to access a gated repo.\nMake sure to have access to it.")


def test_parse_tells_hub_ids_from_paths_and_names(tmp_path):
    assert hub.parse("berkeley-nest/Nectar") == ("berkeley-nest/Nectar", None, "huggingface")
    assert hub.parse("openchat/openchat_3.5@v1.0") == ("openchat/openchat_3.5", "v1.0", "huggingface")
    assert str(hub.parse("a/b@main")) == "a/b@main"
    for not_an_id in ("tiny", "smollm2-135m", "nectar.jsonl", "/abs/path", "a/b/c", "a/b@", "a/b@c@d", "bundled"):
        assert hub.parse(not_an_id) is None, not_an_id
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert hub.parse("org/name") is None   # an existing local folder is a folder


@pytest.mark.slow
def test_notebook_01_runs_on_nectar_by_hub_id(tmp_path, monkeypatch):
    """The papermill path: notebook 01 with nectar_source set to the hub id, the kernel offline
    with only the local cache (a child process: huggingface_hub reads these variables at import)."""
    from starling_lib.pipeline import REPO_ROOT, run_config

    cache = tmp_path / "hub"
    rows = _nectar_parquet(tmp_path / "rlaif.parquet", 397)   # the whole bundled sample, as the hub's parquet
    _put(cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "rlaif.parquet"},
         "dataset")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    run = run_config(REPO_ROOT / "papermill_runs" / "tiny_cpu.yaml", out_dir=tmp_path / "run", only=["01"],
                     progress_bar=False, overrides={"nectar_source": "berkeley-nest/Nectar"})
    m = json.loads((run / "01_nectar_exploration" / "metrics.json").read_text())
    assert m["params/nectar_source"] == "berkeley-nest/Nectar"
    assert m["nectar/num_prompts"] == len(rows) == 397 and m["nectar/num_records_dropped"] == 0
    assert m["nectar/num_answers"] == 2779
