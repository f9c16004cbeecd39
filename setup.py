"""The build's one customisation; everything else is in pyproject.toml.

An editable install (`pip install -e .`, README's quickstart) must install the data files too: the Jupyter
server config that enables the save hook (mochi_lab.display.widgets.save_hook), or a notebook saved with a Studio
shows "Error displaying widget" when reopened without its kernel. setuptools' editable wheel installs a
category of files only where the distribution answers `has_<category>()`, and for data files it asks
`has_data()`, which distutils names `has_data_files()`: the editable wheel never holds them (a regular wheel
does). This distribution answers both. Checked by tests/display/widgets/test_install_save_hook.py in both install modes.
"""

from setuptools import setup
from setuptools.dist import Distribution


class _Distribution(Distribution):
    def has_data(self) -> bool:
        return self.has_data_files()


setup(distclass=_Distribution)
