"""Generation: sampling, ``generate`` and beam search, the decoding copy, the engine and its requests, the
prompts-file mode and the decode thread's CPU threads.
"""
