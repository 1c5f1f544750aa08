"""A deployment script as a user of `pipeline export` writes it: Pillow, numpy and onnxruntime only.

python bench/onnx_predict.py MODEL.onnx FOLDER  ->  JSON {images, seconds, images_per_second} on stdout
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def crop(path: Path, resize: int, size: int) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = image.size
    image = image.resize((resize * w // min(w, h), resize * h // min(w, h)), Image.BILINEAR)
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    return np.asarray(image.crop((left, top, left + size, top + size)))


def main() -> None:
    model, folder = sys.argv[1], Path(sys.argv[2])
    session = ort.InferenceSession(model)
    prep = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    started = time.perf_counter()
    for i in range(0, len(paths), 32):
        batch = np.stack([crop(p, prep["resize"], prep["crop"]) for p in paths[i : i + 32]])
        session.run(["probabilities"], {"images": batch})
    seconds = time.perf_counter() - started
    print(json.dumps({"images": len(paths), "seconds": seconds, "images_per_second": len(paths) / seconds}))


if __name__ == "__main__":
    main()
