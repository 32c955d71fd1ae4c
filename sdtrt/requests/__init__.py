"""What a request is: its fields and their validation, A1111's prompt syntax (attention, editing,
alternation, AND, extra-network tags), styles, infotext, img2img and Extras upscale rules. Built on the
contract; no heavy imports."""
