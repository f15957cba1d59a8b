"""The command lines of grace_st (argument parsing and the glue around library calls), as TRL keeps its scripts.

``grace_st.cli`` installs them as console scripts; ``training/*.py`` and ``eval/*.py`` in the checkout call the same
``main`` functions.
"""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr as the command lines do (``LEVEL logger: message``)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
