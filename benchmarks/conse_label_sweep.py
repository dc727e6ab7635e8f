"""How ConSE's zero-shot accuracy on Fashion-MNIST depends on its text side and on the image.

Sweeps: how ImageNet class labels are embedded (first lemma in a template / all lemmas bare / all
lemmas in a template / ConSE's other ``label_text`` options: lemmas + WordNet gloss and/or
hypernyms), T (top classes combined), the Fashion-MNIST class prompt, and whether images are shown
as stored (white on black) or inverted. This sweep chose ConSE's first defaults; OOD detection
quality on two protocols is measured by benchmarks/zero_shot_default.py.

    python benchmarks/conse_label_sweep.py --images 1000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from oodscope.backbones import create
from oodscope.backbones.conse import LABEL_TEXTS, imagenet_label_texts
from oodscope.backbones.imagenet import imagenet_lemmas
from oodscope.backbones.preprocess import preprocess
from oodscope.io import fashion_mnist

NAMES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    conse = create("conse:effnet-lite0", device="cpu")
    data = fashion_mnist("test")
    pick = np.random.default_rng(args.seed).choice(len(data), args.images, replace=False)
    labels = data.labels[pick]
    lemmas = imagenet_lemmas()
    label_texts = {
        "template+first lemma": [f"a photo of a {lem[0]}." for lem in lemmas],
        "all lemmas (default)": [", ".join(lem) for lem in lemmas],
        "template+all lemmas": [f"a photo of a {', '.join(lem)}." for lem in lemmas],
    } | {option: imagenet_label_texts(option) for option in LABEL_TEXTS if option != "lemmas"}
    label_emb = {k: torch.from_numpy(conse.text_encoder.encode_texts(v)) for k, v in label_texts.items()}
    prompts = {'"a photo of a {}."': [f"a photo of a {n}." for n in NAMES], '"{}"': NAMES}
    prompt_emb = {k: conse.encode_texts(v) for k, v in prompts.items()}
    print(f"{'image':9} {'ImageNet label text':22} {'T':>3} {'class prompt':20} accuracy")
    for shown in ("stored", "inverted"):
        images = [Image.fromarray(255 - data.images[i] if shown == "inverted" else data.images[i]) for i in pick]
        logits = []
        for b in range(0, len(images), 64):
            logits.append(conse.classifier.encode_images(preprocess(images[b:b + 64], conse.input_spec)).logits)
        logits = torch.from_numpy(np.concatenate(logits))
        for label_name, emb in label_emb.items():
            conse.__dict__["label_embeddings"] = emb  # swap the cached label embeddings
            for top_t in (3, 10, 20):
                conse.top_t = top_t
                image_emb = conse.convex_combination(logits).numpy()
                for prompt_name, text in prompt_emb.items():
                    accuracy = ((image_emb @ text.T).argmax(1) == labels).mean()
                    print(f"{shown:9} {label_name:22} {top_t:>3} {prompt_name:20} {accuracy:.3f}")


if __name__ == "__main__":
    main()
