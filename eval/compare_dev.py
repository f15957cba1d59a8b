"""The comparison table on the five dev sets of the data folder (see grace_st.evaluation.dev_comparison).

Usage:
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained outputs/grace-sick-summary/grace-model \
        --trained-readout summary --contrastive outputs/cl-sick-summary --out runs/compare --general
    OMP_NUM_THREADS=1 python eval/compare_dev.py --rows "no rationale" echo PromptEOL --limit 10 --out runs/dry
(the num_rationales curve is experiments/k_curve.py)

All flags: python eval/compare_dev.py --help (the command line is grace_st.scripts.compare_dev.main).
"""

from grace_st.scripts.compare_dev import main

if __name__ == "__main__":
    print(main()["table"])
