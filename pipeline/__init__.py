"""pipeline: transfer learning for image classification on a cached feature store.

from pipeline import configure_process, get_preds, load_model
configure_process()  # optional: the process settings the CLI uses (before torch is imported)
load_model("runs/head-a").predict(["a.jpg"])
get_preds("runs/head-a", "runs/dogscats.h5", split="valid")  # probabilities and targets from the cache
"""

from pipeline.runtime import configure_process


def __getattr__(name):
    # imported on first use, so that configure_process() can run before torch loads
    if name == "load_model":
        from stages.model import load_model

        return load_model
    if name == "get_preds":
        from pipeline.evaluate import get_preds

        return get_preds
    raise AttributeError(name)


__all__ = ["configure_process", "get_preds", "load_model"]
