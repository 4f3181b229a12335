"""ModelScope ids ("modelscope:org/name[@revision]") through the project's own loaders, offline, from a
local ModelScope cache (starling_lib/hub.py).

The cache is modelscope's own layout, written by hand (tests/hub_caches.py): since modelscope 1.38
`<cache>/<type>s/<org>--<name>/snapshots/<revision>/`, and the older one-revision layout, which
modelscope still reads. With MODELSCOPE_OFFLINE set the loaders must find Nectar, the tiny model, its
tokenizer and a reward-model backbone there, by id and revision, through modelscope's own
snapshot_download (local_files_only), and say what to do when they cannot. The Hugging Face cache
is empty and offline throughout, so nothing can come from there.

modelscope is imported here unconditionally: without it (the dev extra installs it) these tests fail
at collection rather than being skipped.
"""

import re
import sys

import modelscope
import pytest
import requests
import torch
from hub_caches import NECTAR_CARD, nectar_parquet, put_modelscope, tiny_files

from starling_lib import hub
from starling_lib.data import load_nectar
from starling_lib.models import load_model_and_tokenizer, load_tokenizer, tiny_model_path


@pytest.fixture
def ms_cache(tmp_path, monkeypatch):
    """An empty ModelScope cache, MODELSCOPE_OFFLINE set; the Hugging Face cache empty and offline;
    datasets' own cache in tmp_path too."""
    import datasets
    from huggingface_hub import constants
    from modelscope_hub.config import set_default_config

    cache = tmp_path / "modelscope"
    cache.mkdir()
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv(hub.MODELSCOPE_OFFLINE, "1")
    set_default_config(None)   # modelscope reads MODELSCOPE_CACHE into its default config once per process
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    yield cache
    set_default_config(None)


def test_nectar_by_modelscope_id_and_revision_from_the_cache(ms_cache, tmp_path):
    rows = nectar_parquet(tmp_path / "master.parquet", 20)
    nectar_parquet(tmp_path / "v1.parquet", 12)
    for revision, parquet in (("master", "master.parquet"), ("v1.0", "v1.parquet")):
        put_modelscope(ms_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD,
                                                          "data/rlaif.parquet": tmp_path / parquet},
                       "dataset", revision)
    ds = load_nectar("modelscope:berkeley-nest/Nectar")
    assert len(ds) == 20 and ds["prompt"] == [r["prompt"] for r in rows]
    assert ds[0]["answers"][0]["rank"] == rows[0]["answers"][0]["rank"]
    assert len(load_nectar("modelscope:berkeley-nest/Nectar@v1.0")) == 12
    cache = re.escape(str(ms_cache.resolve()))
    with pytest.raises(hub.HubError, match=rf"data set modelscope:berkeley-nest/Nectar@v9: MODELSCOPE_OFFLINE is set, "
                                           rf"so only the local ModelScope cache \({cache}\) is looked in.*does not "
                                           rf"hold this revision.*`modelscope download --dataset berkeley-nest/Nectar "
                                           rf"--revision v9`"):
        load_nectar("modelscope:berkeley-nest/Nectar@v9")
    with pytest.raises(hub.HubError, match=r"data set modelscope:berkeley-nest/Nectar-typo: MODELSCOPE_OFFLINE is set"):
        load_nectar("modelscope:berkeley-nest/Nectar-typo")
    # the same id without the prefix is Hugging Face's, whose (empty) cache does not hold it
    with pytest.raises(hub.HubError, match=r"data set berkeley-nest/Nectar: HF_HUB_OFFLINE is set"):
        load_nectar("berkeley-nest/Nectar")


def test_a_bad_record_in_the_modelscope_copy_is_named_by_its_source(ms_cache, tmp_path):
    import pandas as pd

    rows = nectar_parquet(tmp_path / "rlaif.parquet", 6)
    rows[2]["answers"][0]["rank"] = rows[2]["answers"][1]["rank"]   # two answers share a rank
    pd.DataFrame(rows).to_parquet(tmp_path / "rlaif.parquet")
    put_modelscope(ms_cache, "berkeley-nest/Nectar", {"README.md": NECTAR_CARD, "data/rlaif.parquet": tmp_path / "rlaif.parquet"},
                   "dataset")
    with pytest.raises(ValueError, match=r"hub:modelscope:berkeley-nest/Nectar record index 2: two answers share a rank"):
        load_nectar("modelscope:berkeley-nest/Nectar")


def test_model_and_tokenizer_by_modelscope_id_and_revision_from_the_cache(ms_cache):
    put_modelscope(ms_cache, "starling-test/tiny-chat", tiny_files(), "model")
    put_modelscope(ms_cache, "starling-test/tiny-chat", tiny_files(), "model", revision="v1.0")
    model, tokenizer = load_model_and_tokenizer("modelscope:starling-test/tiny-chat", device="cpu")
    local, _ = load_model_and_tokenizer(str(tiny_model_path()), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert tokenizer.chat_template
    assert load_tokenizer("modelscope:starling-test/tiny-chat@v1.0").vocab_size == tokenizer.vocab_size
    with pytest.raises(hub.HubError, match=r"model modelscope:starling-test/tiny-chat@v2: MODELSCOPE_OFFLINE is set.*"
                                           r"snapshots.v2\).*modelscope download --model starling-test/tiny-chat "
                                           r"--revision v2"):
        load_model_and_tokenizer("modelscope:starling-test/tiny-chat@v2", device="cpu")
    with pytest.raises(hub.HubError, match=r"model starling-test/tiny-chat: HF_HUB_OFFLINE is set"):
        load_tokenizer("starling-test/tiny-chat")


def test_reward_model_backbone_by_modelscope_id_from_the_cache(ms_cache):
    from starling_lib.reward_model import build_reward_model

    put_modelscope(ms_cache, "starling-test/tiny-chat", tiny_files(), "model")
    by_id, _ = build_reward_model("modelscope:starling-test/tiny-chat@master", seed=3)
    by_path, _ = build_reward_model(str(tiny_model_path()), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(by_id.state_dict().values(), by_path.state_dict().values()))
    with pytest.raises(hub.HubError, match=r"model modelscope:starling-test/tiny-chat@v2: MODELSCOPE_OFFLINE is set"):
        build_reward_model("modelscope:starling-test/tiny-chat@v2")


def test_a_cache_of_modelscope_before_1_38_is_read(ms_cache):
    """modelscope <= 1.37 kept one revision per repository, dots in the name written '___'."""
    folder = put_modelscope(ms_cache, "starling-test/tiny-chat-0.1", tiny_files(), "model", legacy=True)
    assert folder.name == "tiny-chat-0___1"
    assert hub.snapshot("modelscope:starling-test/tiny-chat-0.1", "model") == folder
    assert load_tokenizer("modelscope:starling-test/tiny-chat-0.1").chat_template


def test_without_modelscope_the_error_says_how_to_install_it(ms_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)   # `import modelscope` now fails as if not installed
    with pytest.raises(hub.HubError, match=r"data set modelscope:berkeley-nest/Nectar: ModelScope ids need the "
                                           r"modelscope package.*pip install -e '\.\[modelscope\]'"):
        load_nectar("modelscope:berkeley-nest/Nectar")
    with pytest.raises(hub.HubError, match=r"model modelscope:a/b: .*pip install -e '\.\[modelscope\]'"):
        load_tokenizer("modelscope:a/b")


def test_hub_failures_say_what_to_do(monkeypatch):
    """Online failures, raised the way modelscope raises them: a missing or refused repository as a
    requests HTTPError caused by modelscope's own error, an unreachable hub as its NetworkError."""
    from modelscope.hub.errors import AuthenticationError, NetworkError, NotExistError

    def failing(error):
        def snapshot_download(*args, **kwargs):
            try:
                raise error
            except Exception as e:
                if isinstance(e, NetworkError):
                    raise
                raise requests.exceptions.HTTPError(str(e)) from e
        return snapshot_download

    monkeypatch.delenv(hub.MODELSCOPE_OFFLINE, raising=False)
    monkeypatch.setattr(modelscope, "snapshot_download", failing(NotExistError("repo not found", status_code=404)))
    with pytest.raises(hub.HubError, match=r"model modelscope:org/missing@v3: no such repository or no revision 'v3' "
                                           r"on ModelScope.*https://modelscope.cn/models/org/missing"):
        load_tokenizer("modelscope:org/missing@v3")
    monkeypatch.setattr(modelscope, "snapshot_download", failing(AuthenticationError("401", status_code=401)))
    with pytest.raises(hub.HubError, match=r"data set modelscope:org/private: access refused by ModelScope; ask for "
                                           r"access at https://modelscope.cn/datasets/org/private.*modelscope login "
                                           r"--token.*MODELSCOPE_API_TOKEN"):
        hub.snapshot("modelscope:org/private")
    monkeypatch.setattr(modelscope, "snapshot_download", failing(NetworkError("Connection failed: modelscope.cn")))
    with pytest.raises(hub.HubError, match=r"model modelscope:org/name: ModelScope could not be reached "
                                           r"\(.*Connection failed: modelscope.cn\).*set MODELSCOPE_OFFLINE=1"):
        hub.pretrained_source("modelscope:org/name")


def test_parse_tells_modelscope_ids(monkeypatch):
    spec = hub.parse("modelscope:AI-ModelScope/Starling-LM-7B-alpha@v1.0")
    assert spec == ("AI-ModelScope/Starling-LM-7B-alpha", "v1.0", "modelscope")
    assert str(spec) == "modelscope:AI-ModelScope/Starling-LM-7B-alpha@v1.0"
    assert hub.parse("modelscope:a/b") == ("a/b", None, "modelscope") and str(hub.parse("modelscope:a/b")) == "modelscope:a/b"
    for not_an_id in ("modelscope:", "modelscope:tiny", "modelscope:a/b/c", "modelscope:a/b@", "modelscope:modelscope:a/b",
                      "huggingface:a/b", "ms:a/b"):
        assert hub.parse(not_an_id) is None, not_an_id
    for value, offline in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv(hub.MODELSCOPE_OFFLINE, value)
        assert hub.modelscope_offline() is offline, value
