"""Console scripts: ``grace-st-train``, ``grace-st-eval``, ``grace-st-publish`` and ``grace-st-encode``.

``pip install grace-st`` installs them (``[project.scripts]``); each calls the ``main`` of its command line in
:mod:`grace_st.scripts`, as the checkout's ``training/train.py``, ``eval/mteb_run.py`` and ``eval/publish.py`` do, so
both forms take the same flags. Each function takes ``argv`` (None: ``sys.argv[1:]``) and returns None (console
scripts exit with the return value, so what a command produced goes to stdout and its files). A missing extra is an
``ImportError`` that names it.
"""

from __future__ import annotations


def train(argv: list[str] | None = None) -> None:
    """``grace-st-train``: :func:`grace_st.scripts.train.main` (train a GRACE model with GRPO and save it)."""
    from grace_st.scripts.train import main

    main(argv)


def evaluate(argv: list[str] | None = None) -> None:
    """``grace-st-eval``: :func:`grace_st.scripts.evaluate.main` (evaluate with mteb, print and save the table).

    Raises:
        ImportError: the eval extra is not installed (the message names it).
    """
    try:
        from grace_st.scripts.evaluate import main
    except ImportError as error:
        raise ImportError('grace-st-eval needs the eval extra: pip install "grace-st[eval]"') from error
    main(argv)


def publish(argv: list[str] | None = None) -> None:
    """``grace-st-publish``: :func:`grace_st.scripts.publish.main` (build the publish folder; write or upload it)."""
    from grace_st.scripts.publish import main

    main(argv)


def encode(argv: list[str] | None = None) -> None:
    """``grace-st-encode``: :func:`grace_st.scripts.encode.main` (encode a corpus on Ray Data, print a summary)."""
    from grace_st.scripts.encode import main

    main(argv)
