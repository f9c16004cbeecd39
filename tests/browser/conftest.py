"""The browser tests share labkit (a private JupyterLab, Chromium's path); --import-mode=importlib puts
no test folder on sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
