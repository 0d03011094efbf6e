"""MoTE and baseline fine-tuning on Ray Train (FSDP2), with checkpoints, metrics and export."""
