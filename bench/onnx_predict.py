"""A deployment script as a user of `pipeline export` writes it: Pillow, numpy and onnxruntime only.

python bench/onnx_predict.py MODEL.onnx FOLDER  ->  JSON {images, seconds, images_per_second, classes} on stdout
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
    names = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    started = time.perf_counter()
    classes = {}
    for i in range(0, len(paths), 32):
        batch = np.stack([crop(p, prep["resize"], prep["crop"]) for p in paths[i : i + 32]])
        (probabilities,) = session.run(["probabilities"], {"images": batch})
        classes.update({str(p): names[k] for p, k in zip(paths[i : i + 32], probabilities.argmax(1))})
    seconds = time.perf_counter() - started
    result = {"images": len(paths), "seconds": seconds, "images_per_second": len(paths) / seconds, "classes": classes}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
