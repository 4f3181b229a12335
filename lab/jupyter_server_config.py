"""JupyterLab as `make lab` starts it: the Makefile adds this folder to JUPYTER_CONFIG_PATH, so a
user's own Jupyter config still applies (and wins where both set the same option).

Next to it, labconfig/default_setting_overrides.json changes two of JupyterLab's default settings
(a user can still change them in Settings): the project runs offline, so the lab neither asks to
fetch the Jupyter news feed nor checks the internet for a newer JupyterLab.

tests/test_lab_browser.py starts the server with this folder and drives it with a browser.
"""

import os

c = get_config()  # noqa: F821 (defined by traitlets when it loads a config file)

# Containers run as root; Jupyter refuses root unless told. The server still listens on
# localhost only and asks for its token unless LAB_ARGS say otherwise (see README, JupyterLab).
c.ServerApp.allow_root = hasattr(os, "geteuid") and os.geteuid() == 0  # no geteuid on Windows

# Notebooks are saved without outputs, so working in the lab never dirties notebooks/*.ipynb in
# git; the outputs stay on screen until the notebook is closed (starling_lib/notebook_format.py).
c.ContentsManager.pre_save_hook = "starling_lib.notebook_format.pre_save_hook"

# The extension manager's default ("pypi") searches PyPI for lab extensions whenever its panel
# opens; the project installs its extensions through pyproject.toml, and runs offline, so the lab
# lists the installed ones and installs nothing itself.
c.LabApp.extension_manager = "readonly"
