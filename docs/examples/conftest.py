"""The examples import as top-level packages, as a topology run from here would."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
