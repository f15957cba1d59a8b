"""General-ability check: does the GRACE model's LM still work as well as its backbone's?

Usage:
    python eval/general_run.py --base default --model runs/grace-sick                      # offline
    python eval/general_run.py --base HuggingFaceTB/SmolLM2-135M-Instruct --model org/grace \
        --lm-eval-tasks gsm8k mmlu --limit 200                                             # lm-eval, Hub access

All flags: python eval/general_run.py --help (the command line is grace_st.scripts.general.main).
"""

from grace_st.scripts.general import main

if __name__ == "__main__":
    main()
