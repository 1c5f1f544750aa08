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
    """The centre crop of the image resized (shorter side to `resize`), computed from only the pixels it keeps:
    Pillow resizes the crop's box of the original (what a whole-image resize would sample there, within one grey
    level), so a 1 x 20000 image costs no more than a small one."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = image.size
    width, height = resize * w // min(w, h), resize * h // min(w, h)
    left, top = round((width - size) / 2), round((height - size) / 2)
    box = (left * w / width, top * h / height, (left + size) * w / width, (top + size) * h / height)
    return np.asarray(image.resize((size, size), Image.BILINEAR, box=box))


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
