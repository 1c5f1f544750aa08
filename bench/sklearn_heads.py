"""The scikit-learn references for heads, run as their own process so that their time is whole-process as ours is:

    python -m bench.sklearn_heads STORE LABELS.csv multi     # one-vs-rest logistic regression, valid mAP
    python -m bench.sklearn_heads STORE LABELS.csv numeric   # RidgeCV, valid R²
    python -m bench.sklearn_heads STORE - lbfgs              # LogisticRegression(C=1), the store's labels, accuracy
    python -m bench.sklearn_heads STORE - sgd                # SGDClassifier(log_loss, 5 epochs), accuracy

The cached features read with plain h5py (the store's schema), standardized on train, fp32 in memory; labels from
the table (a path,label CSV; several labels space-separated) or the store. Prints {"score": ..., "train_rows": ...,
"valid_rows": ...}.
"""

from __future__ import annotations

import csv
import json
import sys

import h5py
import numpy as np


def read(store: str, split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    with h5py.File(store, "r") as f:
        group = f["sets"][next(iter(f["sets"]))][split]
        plain = group["view"][()] == 0
        features = group["features"][()][plain].astype(np.float32)
        return features, [p.decode() for p in group["paths"][()][plain]], group["labels"][()][plain]


def main(store: str, table: str, task: str) -> dict:
    from sklearn.linear_model import LogisticRegression, RidgeCV, SGDClassifier
    from sklearn.metrics import average_precision_score, r2_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    (x, train_paths, y), (xv, valid_paths, yv) = read(store, "train"), read(store, "valid")
    scaler = StandardScaler(copy=False).fit(x)
    x, xv = scaler.transform(x), scaler.transform(xv)
    if task in ("lbfgs", "sgd"):
        if task == "lbfgs":
            model = LogisticRegression(C=1.0)
        else:
            model = SGDClassifier(loss="log_loss", max_iter=5, tol=None, random_state=0)
        return {"score": float((model.fit(x, y).predict(xv) == yv).mean()), "train_rows": len(x), "valid_rows": len(xv)}
    with open(table, newline="") as f:
        labels = {row["path"]: row["label"] for row in csv.DictReader(f)}
    if task == "numeric":
        y, yv = (np.array([float(labels[p]) for p in paths]) for paths in (train_paths, valid_paths))
        score = r2_score(yv, RidgeCV(alphas=np.logspace(-3, 7, 21)).fit(x, y).predict(xv))
    else:
        classes = sorted({c for v in labels.values() for c in v.split()})

        def hot(paths):
            return np.array([[c in labels[p].split() for c in classes] for p in paths], np.uint8)

        model = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=2000)).fit(x, hot(train_paths))
        score = average_precision_score(hot(valid_paths), model.predict_proba(xv), average="macro")
    return {"score": float(score), "train_rows": len(x), "valid_rows": len(xv)}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
