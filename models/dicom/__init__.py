"""DICOM in and out: pixels a model sees from a DICOM image, derived objects in the source's study."""
