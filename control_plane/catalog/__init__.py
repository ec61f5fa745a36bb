"""The catalog: verified model versions and the content-addressed blobs they are made of."""
