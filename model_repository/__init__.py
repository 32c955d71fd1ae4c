"""The Triton model repository: config generation, the Python-backend models, and the server launcher.

    tokenizer -> text_encoder -> scheduler (U-Net loop via BLS to unet) -> vae_decoder -> postprocess
                           all chained by the ensemble ``txt2img``
"""
