"""pipeline: transfer learning for image classification on a cached feature store.

from pipeline import configure_process, load_model
configure_process()  # optional: the process settings the CLI uses (before torch is imported)
load_model("runs/head-a").predict(["a.jpg"])
"""

from pipeline.runtime import configure_process


def __getattr__(name):
    if name == "load_model":  # imported on first use, so that configure_process() can run before torch loads
        from stages.model import load_model

        return load_model
    raise AttributeError(name)


__all__ = ["configure_process", "load_model"]
