"""``python -m divkernels.benchmarks``: see ``runner.py``."""

import sys

from divkernels.benchmarks.runner import main

sys.exit(main())
