"""``python -m verifiers.sandbox --report``: the isolation layers in effect here."""

import sys

from verifiers.sandbox import main

sys.exit(main())
