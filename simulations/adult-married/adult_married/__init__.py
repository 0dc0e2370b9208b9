"""UCI Adult married population: federated fine-tuning of a base pretrained elsewhere."""
