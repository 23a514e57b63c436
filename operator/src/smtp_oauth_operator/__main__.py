"""``python -m smtp_oauth_operator``: the same CLI as the ``smtp-oauth-operator`` script.

Tests and tools start the operator this way from whatever interpreter runs them, so nothing depends
on where an installer put the console script.
"""

import sys

from smtp_oauth_operator.cli import main

sys.exit(main())
