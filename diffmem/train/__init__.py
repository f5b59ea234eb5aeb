"""Fine-tuning loops on accelerate."""
