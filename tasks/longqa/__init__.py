"""Long-context QA: generators.py (passkey, RULER-style needles, variable tracking, MQAR), task.py (the
runner and its options)."""
