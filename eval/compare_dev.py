"""The issue-14 comparison table on the five dev sets of the data folder (see grace_st.comparison).

Usage:
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained outputs/grace-sick-summary/grace-model \
        --trained-readout summary --contrastive outputs/cl-sick-summary --out runs/compare --general \
        --k-curve --k-limit 20
    OMP_NUM_THREADS=1 python eval/compare_dev.py --rows "no rationale" echo PromptEOL --limit 10 --out runs/dry

All flags: python eval/compare_dev.py --help (the command line is grace_st.comparison.main).
"""

from grace_st.comparison import main

if __name__ == "__main__":
    print(main()["table"])
