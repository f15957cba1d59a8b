"""The comparison table on the dev sets of the data folder: five STS sets and TrecQA dev (see
grace_st.evaluation.dev_comparison).

Usage:
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained outputs/grace-sick-summary/grace-model \
        --trained-readout summary --contrastive outputs/cl-sick-summary --out runs/compare --general
    OMP_NUM_THREADS=1 python eval/compare_dev.py --rows "no rationale" echo PromptEOL --limit 10 --out runs/dry
    OMP_NUM_THREADS=1 python eval/compare_dev.py --trained "GRACE, seed 1=outputs/s1/grace-model" \
        --trained "GRACE, seed 2=outputs/s2/grace-model" --contrastive "+CL=outputs/cl" --out runs/compare
(--trained/--contrastive repeat as LABEL=FOLDER; rows are saved under <out>/rows/ and reused, so processes given
disjoint --rows with --only-row-files split the work; --no-trecqa: the five STS sets only)
(the num_rationales curve is experiments/k_curve.py)

All flags: python eval/compare_dev.py --help (the command line is grace_st.scripts.compare_dev.main).
"""

from grace_st.scripts.compare_dev import main

if __name__ == "__main__":
    print(main()["table"])
