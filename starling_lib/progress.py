"""Progress bars: a widget in JupyterLab, plain text when papermill runs a notebook.

`tqdm.auto`, which this library, datasets and transformers use, draws an ipywidgets bar in any
Jupyter kernel, including the kernels papermill starts, where no one watches it: the run's log
shows no progress, and the executed notebook keeps a widget whose text is the bar's first frame
("Map:   0%| 0/397"). A runner sets STARLING_PLAIN_PROGRESS=1 in the kernel's environment
(starling_lib.pipeline, tests/conftest.py's run_notebook); importing starling_lib then makes
`tqdm.auto` tqdm's text bar, written to stderr, which the log streams and the executed notebook
keeps in its last state. In JupyterLab (the variable unset) bars stay widgets.

Only code that looks up `tqdm.auto.tqdm` after starling_lib is imported gets the text bar: the
notebooks import starling_lib before anything that binds it at import (datasets, transformers).
"""

from __future__ import annotations

import os

PLAIN_ENV = "STARLING_PLAIN_PROGRESS"


def use_plain_bars() -> None:
    """Make `tqdm.auto.tqdm` / `trange` (and tqdm.autonotebook's) the text bar, in this process."""
    import tqdm.asyncio
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    tqdm.auto.tqdm = tqdm.asyncio.tqdm  # what tqdm.auto is outside a notebook: the text bar, async-capable
    tqdm.autonotebook.tqdm, tqdm.autonotebook.trange = tqdm.std.tqdm, tqdm.std.trange
    # tqdm.auto.trange looks up tqdm.auto.tqdm when called, so it follows.


def configure_from_environment() -> None:
    """Plain text bars when STARLING_PLAIN_PROGRESS is set to anything but "" or "0"."""
    if os.environ.get(PLAIN_ENV, "") not in ("", "0"):
        use_plain_bars()
