"""Sequence classification (LRA-style). listops.py generates ListOps offline; the task runner and the
text-file / Hugging Face sources come with the TASK=classification issue."""
