"""Evaluate a GRACE model (or any SentenceTransformer) with mteb; optionally compare it with other models.

Usage:
    python eval/mteb_run.py --model default@max_new_tokens=32 --local-task sick_trial_relatedness \
        --compare "echo=default@rationale_mode=echo" --compare "no rationale=default@rationale_mode=none"
    python eval/mteb_run.py --model outputs/grace-sick/grace-model --baselines default \
        --compare "contrastive (+CL)=outputs/cl-sick" --local-task sick_trial_relatedness sts13_headlines
    python eval/mteb_run.py --model runs/grace-sick --benchmark "MTEB(eng, v1)" --output-dir runs/mteb   # Hub access

All flags: python eval/mteb_run.py --help (the command line is grace_st.cli.evaluate, installed as grace-st-eval).
"""

from grace_st.cli import evaluate

if __name__ == "__main__":
    evaluate()
