"""``python -m imsm.report DIR [--table NAME] [--out DIR]``."""

import sys

from imsm.report import main

sys.exit(main())
