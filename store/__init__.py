"""The HDF5 feature store: schema, writer, reader."""
