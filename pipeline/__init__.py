"""pipeline: transfer learning for image classification on a cached feature store."""
