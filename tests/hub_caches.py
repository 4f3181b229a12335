"""Hub caches written by hand, as a download would leave them: Hugging Face's (tests/test_hub.py) and
ModelScope's (tests/test_hub_modelscope.py), and what goes in them (Nectar as the hub's parquet, the tiny model).

  * huggingface_hub: `<cache>/<type>s--<org>--<name>/` with `refs/<branch>` holding a commit and
    `snapshots/<commit>/` holding the files.
  * modelscope >= 1.38 (modelscope_hub's DownloadManager): `<cache>/<type>s/<org>--<name>/snapshots/<revision>/`,
    the revision as asked for (`master` by default), no refs; modelscope <= 1.37 with MODELSCOPE_CACHE
    set: `<cache>/<type>s/<org>/<name>/` with every "." in the name written "___", one revision only.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from starling_lib.data import bundled_path

# The real Nectar's card declares its one split this way (berkeley-nest/Nectar, README.md).
NECTAR_CARD = '---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: "data/rlaif.parquet"\n---\n# Nectar\n'


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline; datasets' own cache in tmp_path too (a fixture: import it)."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return cache


def _write(snap: Path, files: dict) -> None:
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy(src, snap / name)
        else:
            (snap / name).write_text(src)


def put_hf(cache: Path, repo_id: str, files: dict, repo_type: str, branch: str | None = "main") -> str:
    """Write `files` (name -> source path or text) as one snapshot of `repo_id` in a Hugging Face
    cache; point `branch` at it. Returns the snapshot's commit."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}:{sorted(files)}:{branch}:{len(list(root.glob('snapshots/*')))}".encode()).hexdigest()
    _write(root / "snapshots" / commit, files)
    if branch:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / branch).write_text(commit)
    return commit


def put_modelscope(cache: Path, repo_id: str, files: dict, repo_type: str, revision: str = "master",
                   legacy: bool = False) -> Path:
    """Write `files` (name -> source path or text) as `repo_id` at `revision` in a ModelScope cache
    (`legacy`: the one-revision layout of modelscope <= 1.37). Returns the folder."""
    if legacy:
        org, name = repo_id.split("/")
        snap = cache / f"{repo_type}s" / org / name.replace(".", "___")
    else:
        snap = cache / f"{repo_type}s" / repo_id.replace("/", "--") / "snapshots" / revision
    _write(snap, files)
    return snap


def nectar_parquet(path: Path, n: int) -> list[dict]:
    """The first `n` records of the bundled sample as a parquet file like the hub's; returns them."""
    rows = [json.loads(line) for line in bundled_path("nectar_sample.jsonl").read_text().splitlines()[:n]]
    for r in rows:
        r.pop("_provenance", None)
    pd.DataFrame(rows).to_parquet(path)
    return rows


def tiny_files() -> dict:
    """The tiny model's folder (config, weights, tokenizer) as name -> path."""
    from starling_lib.models import tiny_model_path

    return {p.name: p for p in tiny_model_path().iterdir() if p.is_file()}
