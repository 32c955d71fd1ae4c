"""What A1111 does to a finished picture (its "postprocessing": Extras, the hires fix's model upscale, restore
faces): upscaler models tiled, Extras' size rules, faces found, restored and pasted back. Thin: numpy, PIL (and
OpenCV for faces), with each network a callable that the job, the in-process runner or the client supplies."""
