"""The MoTE model: stage-routed LoRA experts + a shared expert (layer, routing, model, export, generation)."""
