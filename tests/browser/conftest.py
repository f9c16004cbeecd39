"""The browser tests share tests/support/labkit.py (a private JupyterLab, Chromium's path)."""
