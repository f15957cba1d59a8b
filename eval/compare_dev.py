"""The issue-14 comparison table on the five dev sets of the data folder (see grace_st.comparison).

Usage:
    python eval/compare_dev.py --trained outputs/grace-sick/grace-model --contrastive outputs/cl-sick \
        --out runs/compare --k-curve --k-limit 20 --general
    python eval/compare_dev.py --rows "no rationale" echo PromptEOL --limit 10 --out runs/compare-dry
"""

from grace_st.comparison import main

if __name__ == "__main__":
    print(main()["table"])
