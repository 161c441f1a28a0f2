"""`python -m accel` (and `accelerate launch -m accel`)."""

import sys

from accel.cli import main

sys.exit(main())
