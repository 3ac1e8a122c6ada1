"""`python -m matformer.cli` (what torchrun runs): the same entry point as `matformer`."""

import sys

from matformer.cli import main

sys.exit(main())
