"""Hub ids: one home for how models and data sets are fetched from a hub (Hugging Face or ModelScope).

A hub spec is `"org/name"` (the default branch, main) or `"org/name@revision"` (a branch, a tag or
a commit), wherever the notebooks take a model or a Nectar source. Downloads go through
huggingface_hub, so its settings hold: `HF_TOKEN` (or `hf auth login`) for gated repositories,
`HF_HOME` / `HF_HUB_CACHE` for the cache, `HF_HUB_OFFLINE=1` to use only what is cached.

  * data sets: `snapshot(spec, "dataset")` downloads (or finds in the cache) the repository's
    files, which `datasets.load_dataset(folder)` then reads as a local folder, with the splits its
    card declares. `datasets.load_dataset("org/name")` itself cannot do this offline: it looks only
    in its own cache of prepared data sets, never in the hub cache, so a data set downloaded by
    `hf download` or on another machine would not be found.
  * models: `transformers.from_pretrained(repo_id, revision=...)`, which picks the weight files
    it needs; `pretrained_source` splits the spec for it and `hub_errors` turns its failures into
    one message.

Errors (`HubError`) say what to do: a gated or private repository names `hf auth login` / `HF_TOKEN`
and the page where access is asked for; a repository or revision that does not exist names it;
offline with nothing cached names `HF_HUB_OFFLINE` and the cache folder.

ModelScope (modelscope.cn) is the second hub, chosen per id by a prefix: `"modelscope:org/name"` or
`"modelscope:org/name@revision"`; an id without it is a Hugging Face id, as before. A ModelScope id,
model or data set, is fetched whole by modelscope's `snapshot_download` into ModelScope's cache, and
the local folder is then read as any folder is (`from_pretrained(folder)`, `datasets.load_dataset(folder)`).
It needs the optional package (`pip install -e '.[modelscope]'`; the dev extra has it too). Its
settings hold: `MODELSCOPE_CACHE` for the cache (default ~/.cache/modelscope; since modelscope 1.38
the layout is `<cache>/<type>s/<org>--<name>/snapshots/<revision>/`, revision default `master`, and
the older `<cache>/<type>s/<org>/<name with . as ___>/` is still read), `MODELSCOPE_API_TOKEN` or
`modelscope login` for private repositories. modelscope has no offline variable of its own (its
switch is `snapshot_download(local_files_only=True)`), so this module passes that switch when
`MODELSCOPE_OFFLINE` is set (1/true/yes/on); unlike huggingface_hub, modelscope does not fall back
to its cache when the hub cannot be reached. Errors say what to do the same way: modelscope not
installed, offline and not cached (the cache folder and the `modelscope download` command), no such
repository, access refused, hub unreachable.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

HUGGINGFACE, MODELSCOPE = "huggingface", "modelscope"
MODELSCOPE_PREFIX = "modelscope:"        # "modelscope:org/name[@revision]": the id is ModelScope's
MODELSCOPE_OFFLINE = "MODELSCOPE_OFFLINE"   # read by this module: only ModelScope's local cache is used
MODELSCOPE_INSTALL = "pip install -e '.[modelscope]'"


class HubError(RuntimeError):
    """A hub repository that could not be had, with what to do about it."""


class HubSpec(NamedTuple):
    repo_id: str
    revision: str | None    # None: the default branch
    hub: str = HUGGINGFACE  # or MODELSCOPE

    def __str__(self) -> str:
        prefix = MODELSCOPE_PREFIX if self.hub == MODELSCOPE else ""
        return prefix + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse(spec: str) -> HubSpec | None:
    """"org/name" or "org/name@revision" -> a Hugging Face HubSpec; the same behind "modelscope:" ->
    a ModelScope one; anything else (a path, a short name) -> None."""
    if Path(spec).exists():
        return None
    hub, rest = HUGGINGFACE, spec
    if spec.startswith(MODELSCOPE_PREFIX):
        hub, rest = MODELSCOPE, spec[len(MODELSCOPE_PREFIX):]
    repo_id, _, revision = rest.partition("@")
    if not _ID.match(repo_id) or (rest.count("@") > 1) or ("@" in rest and not revision):
        return None
    return HubSpec(repo_id, revision or None, hub)


def _page(spec: HubSpec, repo_type: str) -> str:
    if spec.hub == MODELSCOPE:
        return f"https://modelscope.cn/{'datasets' if repo_type == 'dataset' else 'models'}/{spec.repo_id}"
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{spec.repo_id}"


@contextlib.contextmanager
def hub_errors(spec: HubSpec, repo_type: str = "model") -> Iterator[None]:
    """Turn huggingface_hub's (and transformers') failures to fetch `spec` into a HubError that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    what = f"{'data set' if repo_type == 'dataset' else 'model'} {spec}"
    try:
        yield
    except (GatedRepoError, RevisionNotFoundError, RepositoryNotFoundError, LocalEntryNotFoundError, OSError) as e:
        # transformers re-raises the hub's errors as OSErrors of its own: look for the hub's along the chain
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, (GatedRepoError, RevisionNotFoundError,
                                                           RepositoryNotFoundError, LocalEntryNotFoundError)):
            cause = cause.__cause__ or cause.__context__
        text = str(e)
        if isinstance(cause, GatedRepoError) or (cause is None and ("gated" in text.lower() or " 401" in text)):
            raise HubError(f"{what}: access refused; the repository is gated. Ask for access at "
                           f"{_page(spec, repo_type)}, then log in with `hf auth login` (older: `huggingface-cli "
                           f"login`) or set HF_TOKEN") from e
        if isinstance(cause, RevisionNotFoundError):
            raise HubError(f"{what}: revision {spec.revision!r} does not exist (a branch, tag or commit of "
                           f"{_page(spec, repo_type)})") from e
        if isinstance(cause, RepositoryNotFoundError):
            raise HubError(f"{what}: no such repository, or it is private (for a private one, `hf auth login` or "
                           f"HF_TOKEN); check the id at {_page(spec, repo_type)}") from e
        if isinstance(cause, LocalEntryNotFoundError):
            offline = "HF_HUB_OFFLINE is set, so" if constants.HF_HUB_OFFLINE else "the hub could not be reached and"
            command = (f"hf download {spec.repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
                       + (f" --revision {spec.revision}" if spec.revision else ""))
            raise HubError(f"{what}: {offline} only the local cache ({constants.HF_HUB_CACHE}) is looked in, and it "
                           f"does not hold {'this revision' if spec.revision else 'it'}; download it where the hub "
                           f"is reachable (`{command}`) or unset HF_HUB_OFFLINE") from e
        raise


def pretrained_source(name_or_path: str):
    """(what from_pretrained loads, its revision, a context that explains hub failures): a hub spec
    "org/name@revision" is split; a folder passes as it is, with no context to speak of. A ModelScope
    id is fetched here (`snapshot`, which explains its own failures) and passes on as its local folder."""
    spec = parse(name_or_path)
    if spec is None:
        return name_or_path, None, contextlib.nullcontext()
    if spec.hub == MODELSCOPE:
        return str(snapshot(spec, "model")), None, contextlib.nullcontext()
    return spec.repo_id, spec.revision, hub_errors(spec, "model")


def snapshot(spec: HubSpec | str, repo_type: str = "dataset") -> Path:
    """The local folder of a hub repository at its revision: downloaded once, then from the cache."""
    if isinstance(spec, str):
        parsed = parse(spec)
        if parsed is None:
            raise ValueError(f"{spec!r} is not a hub id (org/name, org/name@revision, or either behind "
                             f"{MODELSCOPE_PREFIX!r})")
        spec = parsed
    if spec.hub == MODELSCOPE:
        return _modelscope_snapshot(spec, repo_type)
    from huggingface_hub import snapshot_download

    with hub_errors(spec, repo_type):
        return Path(snapshot_download(spec.repo_id, repo_type=repo_type, revision=spec.revision))


# ------------------------------------------------------------------------------------------------
# ModelScope


def modelscope_offline() -> bool:
    """Whether MODELSCOPE_OFFLINE is set (read at each call): ModelScope ids come from the local cache only."""
    return os.environ.get(MODELSCOPE_OFFLINE, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def modelscope_cache() -> Path:
    """The folder modelscope downloads into (MODELSCOPE_CACHE, default ~/.cache/modelscope)."""
    from modelscope_hub.config import get_default_config   # what modelscope's snapshot_download uses
    return Path(get_default_config().cache_dir)


def _modelscope_snapshot(spec: HubSpec, repo_type: str) -> Path:
    what = f"{'data set' if repo_type == 'dataset' else 'model'} {spec}"
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise HubError(f"{what}: ModelScope ids need the modelscope package, which is not installed; install "
                       f"it with `{MODELSCOPE_INSTALL}` (the dev extra has it too)") from e
    with modelscope_errors(spec, repo_type):
        return Path(snapshot_download(repo_id=spec.repo_id, repo_type=repo_type, revision=spec.revision,
                                      local_files_only=modelscope_offline()))


@contextlib.contextmanager
def modelscope_errors(spec: HubSpec, repo_type: str = "model") -> Iterator[None]:
    """Turn modelscope's failures to fetch `spec` into a HubError that says what to do."""
    from modelscope.hub.errors import (AuthenticationError, CacheNotFound, NetworkError, NotExistError,
                                       PermissionDeniedError)

    known = (AuthenticationError, CacheNotFound, NetworkError, NotExistError, PermissionDeniedError)
    what = f"{'data set' if repo_type == 'dataset' else 'model'} {spec}"
    try:
        yield
    except Exception as e:
        # modelscope re-raises a missing or refused repository as a requests HTTPError: look along the chain
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, known):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, CacheNotFound):
            command = (f"modelscope download --{'dataset' if repo_type == 'dataset' else 'model'} {spec.repo_id}"
                       + (f" --revision {spec.revision}" if spec.revision else ""))
            raise HubError(f"{what}: {MODELSCOPE_OFFLINE} is set, so only the local ModelScope cache "
                           f"({modelscope_cache()}) is looked in, and it does not hold "
                           f"{'this revision' if spec.revision else 'it'} (looked in {cause.cache_dir}); download "
                           f"it where modelscope.cn is reachable (`{command}`) or unset {MODELSCOPE_OFFLINE}") from e
        if isinstance(cause, (AuthenticationError, PermissionDeniedError)):
            raise HubError(f"{what}: access refused by ModelScope; ask for access at {_page(spec, repo_type)}, then "
                           f"log in with `modelscope login --token <token>` or set MODELSCOPE_API_TOKEN") from e
        if isinstance(cause, NotExistError):
            revision = f" or no revision {spec.revision!r}" if spec.revision else ""
            raise HubError(f"{what}: no such repository{revision} on ModelScope, or it is private (then "
                           f"`modelscope login --token <token>` or MODELSCOPE_API_TOKEN); check the id at "
                           f"{_page(spec, repo_type)}") from e
        if isinstance(cause, NetworkError):
            raise HubError(f"{what}: ModelScope could not be reached ({str(cause).splitlines()[0]}); modelscope "
                           f"does not fall back to its cache by itself: with a copy already in {modelscope_cache()}, "
                           f"set {MODELSCOPE_OFFLINE}=1") from e
        raise
