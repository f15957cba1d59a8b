"""Publish a saved GRACE model to the Hugging Face Hub (or write the exact folder that would be uploaded).

Usage (the same command as `grace-st-publish`; `--help` lists every flag):
    python eval/publish.py --model runs/grace-sick --repo-id my-org/grace-smollm2-135m --results-dir runs/mteb \
        --dry-run /tmp/grace-publish
    python eval/publish.py --model runs/grace-sick --repo-id my-org/grace-smollm2 --results-dir runs/mteb --private
"""

from grace_st.cli import publish

if __name__ == "__main__":
    publish()
