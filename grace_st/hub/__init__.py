"""Publishing GRACE models to the Hugging Face Hub: the folder that is uploaded and its model card."""
