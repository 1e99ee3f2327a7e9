"""Reading text: the tokenizer, the corpus readers, encoding, the token cache and the batches. Imports the model's
config only.
"""
