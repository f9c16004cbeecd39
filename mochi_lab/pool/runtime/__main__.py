"""`python -m mochi_lab.pool.runtime serve DATA_DIR`: the local runtime's daemon (its handles start it so)."""

import sys
from pathlib import Path

from mochi_lab.pool.runtime.daemon import serve

if len(sys.argv) != 3 or sys.argv[1] != "serve":
    sys.exit("usage: python -m mochi_lab.pool.runtime serve DATA_DIR")
sys.exit(serve(Path(sys.argv[2])))
