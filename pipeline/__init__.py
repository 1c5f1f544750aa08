"""pipeline: transfer learning for image classification on a cached feature store.

    from pipeline import load_model
    load_model("runs/head-a").predict(["a.jpg"])
"""
import os

# Decode threads share the cores with torch's OpenMP pool: idle OpenMP threads must sleep, not spin
# (measured 10 % faster featurize on 2 cores). Only effective before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    if name == "load_model":  # imported on first use: torch loads after the setting above
        from stages.model import load_model

        return load_model
    raise AttributeError(name)
