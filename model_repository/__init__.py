"""The Triton model repository: config generation, the Python-backend models, the server launcher and its healer.

    txt2img / img2img (Python models users call), through BLS:
        tokenizer -> text_encoder -> the denoising loop (one unet call a step) -> vae_decoder
"""
