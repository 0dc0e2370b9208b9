"""Fashion-MNIST with a group-dependent label rule: FairLoRA on a frozen MONAI DenseNet."""
