"""The Triton models themselves (Python backend): tokenizer, networks, the txt2img/img2img job models and
the progress model, with their BLS calls, metrics and step batcher. Generated repositories load them by name."""
