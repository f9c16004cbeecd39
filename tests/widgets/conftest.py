"""Widget tests drive real jobs on the session's `mochi` cluster; widget_helpers steps their polling."""

import sys
from pathlib import Path

# --import-mode=importlib puts no test dir on sys.path; widget_helpers sits next to these tests
sys.path.insert(0, str(Path(__file__).parent))
