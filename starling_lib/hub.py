"""Hub ids: one home for how models and data sets are fetched from the Hugging Face hub.

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
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, NamedTuple

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(RuntimeError):
    """A hub repository that could not be had, with what to do about it."""


class HubSpec(NamedTuple):
    repo_id: str
    revision: str | None    # None: the default branch

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse(spec: str) -> HubSpec | None:
    """"org/name" or "org/name@revision" -> HubSpec; anything else (a path, a short name) -> None."""
    repo_id, _, revision = spec.partition("@")
    if not _ID.match(repo_id) or Path(spec).exists() or (spec.count("@") > 1) or ("@" in spec and not revision):
        return None
    return HubSpec(repo_id, revision or None)


def _page(spec: HubSpec, repo_type: str) -> str:
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
    "org/name@revision" is split; a folder passes as it is, with no context to speak of."""
    spec = parse(name_or_path)
    if spec is None:
        return name_or_path, None, contextlib.nullcontext()
    return spec.repo_id, spec.revision, hub_errors(spec, "model")


def snapshot(spec: HubSpec | str, repo_type: str = "dataset") -> Path:
    """The local folder of a hub repository at its revision: downloaded once, then from the cache."""
    from huggingface_hub import snapshot_download

    if isinstance(spec, str):
        parsed = parse(spec)
        if parsed is None:
            raise ValueError(f"{spec!r} is not a hub id (org/name or org/name@revision)")
        spec = parsed
    with hub_errors(spec, repo_type):
        return Path(snapshot_download(spec.repo_id, repo_type=repo_type, revision=spec.revision))
