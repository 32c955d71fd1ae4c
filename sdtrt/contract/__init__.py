"""The contract every layer reads: the model spec (tensor names, shapes, profiles, request limits), errors,
samplers and schedules, the seed contract, atomic files, images and outputs. No heavy imports: a client-only
install has it."""
