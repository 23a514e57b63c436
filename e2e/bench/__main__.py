"""``python -m e2e.bench``: see :mod:`e2e.bench.run`; ``python -m e2e.bench memory``: :mod:`e2e.bench.memory`;
``python -m e2e.bench relay``: :mod:`e2e.bench.relay`."""

import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
for _path in (_REPO_ROOT, _REPO_ROOT / "operator" / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

if sys.argv[1:2] == ["relay"]:
    from e2e.bench.relay import main as relay_main

    sys.exit(relay_main(sys.argv[2:]))

if sys.argv[1:2] == ["memory"]:
    from e2e.bench.memory import main

    sys.exit(main(sys.argv[2:]))

from e2e.bench.run import main  # noqa: E402

sys.exit(main())
