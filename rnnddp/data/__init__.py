"""Data: on-disk formats (``mnist``), image-to-sequence views (``views``), splits and batches (``batches``)."""
