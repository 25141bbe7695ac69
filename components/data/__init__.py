"""Data: sources and archives, DICOM, pseudonyms, the phantom, validation, near-duplicate groups, the split and its TFRecords."""
