"""Small local STS tasks for the evaluation, local-task, CLI and hub tests (one definition of the test data)."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A man is playing a guitar.", "A woman is slicing onions.", 0.2),
    ("Kids are running in a park.", "Children run outside.", 4.0),
    ("Kids are running in a park.", "The stock market fell today.", 0.0),
    ("A dog barks at the mailman.", "A dog is barking.", 3.6),
    ("The stock market fell today.", "Shares dropped sharply.", 4.2),
]
THREE_PAIRS = [("A man plays.", "A man is playing.", 4.5), ("A cat.", "Stocks fell.", 0.5), ("Rain.", "It rains.", 3)]


def write_sts_spec(folder: Path, name: str = "TinySTS", pairs=PAIRS, **extra) -> Path:
    """An STS spec ``<name>.json`` over ``pairs.tsv`` (``score<TAB>s1<TAB>s2``) in ``folder``; returns its path."""
    (folder / "pairs.tsv").write_text("".join(f"{s}\t{a}\t{b}\n" for a, b, s in pairs), encoding="utf-8")
    columns = {"score": 0, "sentence1": 1, "sentence2": 2}
    spec = {
        "name": name,
        "type": "STS",
        "splits": {"test": {"path": "pairs.tsv", "header": False, "columns": columns}},
        **extra,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def write_dev_sets(root: Path) -> Path:
    """A data folder with the five dev files of the comparison (and the general check's held-out file), each holding
    :data:`PAIRS`; returns ``root``."""
    from grace_st.evaluation.dev_comparison import DEV_SETS

    for _, relative in DEV_SETS:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.startswith("sick"):
            lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
            lines += [f"{i}\t{a}\t{b}\t{1 + s * 0.8:.2f}\tNEUTRAL" for i, (a, b, s) in enumerate(PAIRS)]
        else:
            lines = [f"{s}\t{a}\t{b}" for a, b, s in PAIRS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "sts2012" / "MSRpar.train.tsv").write_text("".join(f"3\t{a}\t{b}\n" for a, b, _ in PAIRS), "utf-8")
    return root


# (question, sentence, label): "Who plays ?" has two answers, "A man plays the guitar." answers two questions and
# "Why ?" has none (it is not scored).
QA_ROWS = [
    ("Who plays the guitar ?", "A man plays the guitar.", 1),
    ("Who plays the guitar ?", "Stocks fell , sharply .", 0),
    ("Who plays the guitar ?", "A man is playing a guitar.", 1),
    ("What does the man play ?", "A man plays the guitar.", 1),
    ("What does the man play ?", "Kids are running in a park.", 0),
    ("What fell today ?", "The stock market fell today.", 1),
    ("What fell today ?", "A dog is barking.", 0),
    ("Why ?", "A dog is barking.", 0),
]


def write_trecqa(root: Path, rows=QA_ROWS) -> Path:
    """``<root>/trecqa/dev.csv`` (``qtext,label,atext``, quoted where a cell has a comma) of ``rows``; returns root."""
    import csv

    path = root / "trecqa" / "dev.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["qtext", "label", "atext"])
        writer.writerows([question, label, sentence] for question, sentence, label in rows)
    return root
