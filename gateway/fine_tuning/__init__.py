"""Fine-tuning: the Files and fine-tuning job routes, training data, SFT and the trainer worker."""
