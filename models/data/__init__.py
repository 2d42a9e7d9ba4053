"""Images and data sets: decoding, tensors, on-disk layouts, seeded subsets and augmentation."""
