"""Language modeling on packed text: data.py (corpora, packing), tokenizers.py, evaluate.py (loss,
bits per byte, loss by position), task.py (the runner)."""
