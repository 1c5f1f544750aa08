"""The featurize loop a competent user writes instead of pipeline: torchvision ImageFolder + PIL + DataLoader
(num_workers=2, batch 64), the same frozen Lite0 and preprocessing in fp32, channels_last, under inference_mode.
Prints {"images", "seconds", "images_per_second"} (the loop alone) as JSON; --out saves the features.

    python bench/reference_featurize.py ../shared/data/dogscats/valid --out /tmp/reference.npy
"""

import argparse
import json
import time

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from stages.backbones import create_backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--out")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    backbone = create_backbone()
    pp = backbone.preprocessing
    transform = T.Compose(
        [
            T.Resize(pp.resize),
            T.CenterCrop(pp.size),
            T.ToTensor(),
            T.Normalize([m / 255 for m in pp.mean], [s / 255 for s in pp.std]),
        ]
    )
    loader = DataLoader(ImageFolder(args.folder, transform), batch_size=args.batch_size, num_workers=2)
    model = backbone.model.eval().to(memory_format=torch.channels_last)
    features = []
    started = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            features.append(model(images.contiguous(memory_format=torch.channels_last)).numpy())
    seconds = time.perf_counter() - started
    features = np.concatenate(features)
    if args.out:
        np.save(args.out, features)
    print(json.dumps({"images": len(features), "seconds": seconds, "images_per_second": len(features) / seconds}))


if __name__ == "__main__":
    main()
